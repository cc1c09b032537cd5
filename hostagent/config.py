"""The agent's oslo.config options, a private ``ConfigOpts`` factory and ``list_opts``.

The agent uses a private ``ConfigOpts`` (not the global ``cfg.CONF``) so that tests and
benchmarks can run several agents and clients in one process without shared state; the
options oslo.messaging and oslo.log read are therefore registered explicitly in
:func:`make_conf`. ``transport_url`` is oslo.messaging's own [DEFAULT] option: defining it
again here would clash (DuplicateOptError), so the sample lists it under that namespace.
Embedded defaults work on a single machine: ``qemu:///system``, state under /var/lib/qsnap.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from oslo_config import cfg
from oslo_log import log as oslo_log

from hostagent.rpc.messaging import register_messaging_opts

default_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<hostname>",
        help="Name of this compute host: the RPC server name on topic qsnap-agent and the "
        "host reported in inventory updates. Must match Nova's host name for routing.",
    ),
    cfg.StrOpt(
        "state_path",
        default="/var/lib/qsnap",
        help="Directory for the agent's journal (sqlite) and other state.",
    ),
]

libvirt_opts: list[cfg.Opt] = [
    cfg.StrOpt("uri", default="qemu:///system", help="libvirt connection URI."),
    cfg.FloatOpt(
        "open_timeout",
        default=30.0,
        min=0.1,
        help="Seconds to keep retrying to (re)connect to libvirtd before failing a request.",
    ),
]

agent_opts: list[cfg.Opt] = [
    cfg.IntOpt(
        "workers",
        default=4,
        min=1,
        max=64,
        help="Size of the bounded worker pool running long operations (backups, verifies, "
        "restores, prunes, instance snapshots, deletes of the agent's own snapshots); "
        "further requests wait in the queue (each disk is serialized separately).",
    ),
    cfg.IntOpt(
        "cinder_workers",
        default=2,
        min=1,
        max=64,
        help="Size of a separate pool for Cinder-driven assisted creates and deletes, so "
        "a queue in the [agent] workers pool cannot hold them past Cinder's wait. Each disk "
        "is still serialized with every other operation on it.",
    ),
    cfg.FloatOpt(
        "freeze_timeout",
        default=10.0,
        min=0.1,
        help="Longest a guest may stay frozen for a quiesced snapshot; the thaw watchdog "
        "thaws it after this many seconds whatever happens.",
    ),
    cfg.FloatOpt(
        "create_deadline",
        default=600.0,
        min=1.0,
        help="Seconds after an assisted create is accepted until Cinder stops waiting for "
        "it (Cinder's remotefs driver: 600). Its snapshot is not started later than this "
        "minus freeze_timeout minus 5 s; a create not started by then fails without "
        "touching the chain and sends Cinder no status (Cinder marks it error itself and "
        "refuses later updates).",
    ),
    cfg.FloatOpt(
        "delete_deadline",
        default=7200.0,
        min=1.0,
        help="Seconds after an assisted delete is accepted until Cinder stops waiting for "
        "it (Cinder's remotefs driver: 7200). A merge not started by then fails without "
        "touching the chain and sends Cinder no status; a merge started in time runs to "
        "its end (bounded by merge_timeout).",
    ),
    cfg.FloatOpt(
        "merge_timeout",
        default=7200.0,
        min=1.0,
        help="Deadline in seconds for one block job (commit/pull). Cinder waits 7200 s for "
        "a delete, so a longer deadline is pointless.",
    ),
    cfg.FloatOpt(
        "inventory_interval",
        default=60.0,
        min=1.0,
        help="Seconds between periodic inventory publications (changes are published at "
        "once as well). qsnap-api forgets a host it has not heard from for its [api] "
        "host_ttl (180 s), so keep this a fraction of that.",
    ),
]

shares_opts: list[cfg.Opt] = [
    cfg.ListOpt(
        "allowed_roots",
        default=["/var/lib/nova/mnt"],
        help="Directories under which volume files may live. Any image, backing file or "
        "requested file outside them is refused.",
    ),
    cfg.StrOpt(
        "mount_base",
        default="/var/lib/nova/mnt",
        help="Where the shares are mounted (Nova's nfs_mount_point_base); share mounts are "
        "<mount_base>/<hash>.",
    ),
]

cinder_opts: list[cfg.Opt] = [
    cfg.BoolOpt(
        "enabled",
        default=True,
        help="Whether a volume service exists. When false (a host without Cinder, the demo) "
        "the agent still keeps the .info ledgers of the snapshots it takes itself but "
        "makes no Cinder record calls, and journals that it skipped them.",
    ),
    cfg.StrOpt(
        "auth_type",
        default="none",
        choices=[
            ("none", "no authentication (Cinder with auth_strategy=noauth, token 'notused')"),
            ("noauth", "cinderclient's noauth plugin: 'user:project' token, needs endpoint"),
            ("password", "keystone password authentication"),
        ],
        help="How the agent authenticates to the volume service.",
    ),
    cfg.URIOpt(
        "endpoint",
        help="Volume API endpoint, e.g. http://host:8776/v3 (required "
        "for none/noauth; overrides the catalog for password).",
    ),
    cfg.URIOpt("auth_url", help="Keystone URL (password auth)."),
    cfg.StrOpt("username", help="Keystone user name (password auth)."),
    cfg.StrOpt("password", secret=True, help="Keystone password (password auth)."),
    cfg.StrOpt("user_id", help="User id (noauth, or password auth by id)."),
    cfg.StrOpt("project_id", help="Project id (noauth, or password auth by id)."),
    cfg.StrOpt("project_name", help="Project name (password auth)."),
    cfg.StrOpt("user_domain_name", default="Default", help="User's domain (password auth)."),
    cfg.StrOpt("project_domain_name", default="Default", help="Project's domain (password auth)."),
    cfg.StrOpt("region_name", help="Region of the volume endpoint in the catalog."),
    cfg.StrOpt(
        "endpoint_type",
        default="publicURL",
        choices=["publicURL", "internalURL", "adminURL"],
        help="Catalog interface of the volume endpoint.",
    ),
    cfg.FloatOpt("timeout", default=30.0, min=0.1, help="HTTP timeout per request (s)."),
    cfg.IntOpt(
        "status_retries",
        default=10,
        min=0,
        help="Retries with backoff of a status update on connection errors and 5xx before "
        "it is left in the journal for a later retry.",
    ),
]

backup_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "repository",
        help="Directory of the chunked backup repository. Put it on a share every agent "
        "mounts so any host can list, verify and restore. It must already hold a repository "
        "unless create_repository is set (an empty directory there usually means the share "
        "is not mounted). Default: <state_path>/backups (one-machine use, created on first "
        "use).",
    ),
    cfg.BoolOpt(
        "create_repository",
        default=False,
        help="Create a NEW repository in [backup] repository (and the directory) when none "
        "is there. Off by default so that a missing or unmounted share refuses backups "
        "instead of silently filling the local disk; set it once to start a new repository.",
    ),
    cfg.IntOpt(
        "zstd_level",
        default=1,
        min=1,
        max=19,
        help="zstd level of new chunks (a repository keeps its level once created). Level "
        "1: backups are CPU-bound on small hosts.",
    ),
    cfg.IntOpt(
        "chunk_size_mib",
        default=4,
        choices=[1, 2, 4, 8, 16, 32, 64],
        help="Chunk size of a NEW repository in MiB (an existing one keeps its own).",
    ),
    cfg.IntOpt(
        "max_parallel",
        default=2,
        min=1,
        max=32,
        help="Volumes of one backup request backed up at once (each reads and compresses "
        "on its own threads).",
    ),
    cfg.IntOpt(
        "keep_last",
        default=7,
        min=1,
        help="Default retention of a prune that names no rule: the N newest backups of "
        "each volume.",
    ),
    cfg.IntOpt(
        "bandwidth_mib",
        default=0,
        min=0,
        help="Read bandwidth of one volume's backup stream in MiB/s (0: unlimited), so a "
        "backup does not saturate the share it reads from; a request backing up N volumes "
        "at once reads up to N times this.",
    ),
    cfg.StrOpt(
        "restore_dir",
        help="Directory (under [shares] allowed_roots) where a restore onto a new volume "
        "writes volume-<id>; default: the directory of the backup's source volume if it "
        "is attached here.",
    ),
]

journal_opts: list[cfg.Opt] = [
    cfg.FloatOpt(
        "purge_age_days",
        default=30.0,
        min=0.0,
        help="Final operations (succeeded, failed, cancelled) last updated more than this "
        "many days ago are deleted from the journal with their steps by a periodic purge. "
        "Unfinished operations and operations with an undelivered volume-service notice "
        "are never purged. 0 disables the purge (the journal then grows forever).",
    ),
    cfg.FloatOpt(
        "purge_interval",
        default=3600.0,
        min=1.0,
        help="Seconds between journal purge passes (the first runs when the agent starts).",
    ),
]

nova_opts: list[cfg.Opt] = [
    cfg.BoolOpt(
        "enabled",
        default=False,
        help="Whether Nova manages guests on this host. When true, every chain change the "
        "agent makes by itself on a Nova guest (instance snapshot, delete of its own "
        "snapshot) ends with Nova's block-device mapping refreshed through qsnap's driver "
        "in nova-compute (compute_driver = qsnap.QsnapLibvirtDriver), and is refused before "
        "it starts when that driver does not answer. When false, chain changes on a guest "
        "carrying Nova's domain metadata are refused (Nova would not learn of them).",
    ),
    cfg.StrOpt(
        "transport_url",
        secret=True,
        help="Transport on which nova-compute's qsnap driver listens (its [qsnap] "
        "transport_url); default: the agent's own transport_url.",
    ),
    cfg.FloatOpt(
        "ping_timeout",
        default=5.0,
        min=0.1,
        help="Seconds the check before a chain change waits for Nova's side to answer.",
    ),
    cfg.FloatOpt(
        "refresh_timeout",
        default=60.0,
        min=1.0,
        help="Seconds one BDM refresh may take (Nova re-reads Cinder's attachment).",
    ),
]

_GROUPS: list[tuple[str | None, list[cfg.Opt]]] = [
    (None, default_opts),
    ("libvirt", libvirt_opts),
    ("agent", agent_opts),
    ("shares", shares_opts),
    ("cinder", cinder_opts),
    ("nova", nova_opts),
    ("backup", backup_opts),
    ("journal", journal_opts),
]


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """The ``oslo.config.opts`` entry point ``qsnap`` for oslo-config-generator."""
    return [(group, list(opts)) for group, opts in _GROUPS]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the agent's own options (not oslo.messaging's or oslo.log's) on ``conf``."""
    for group, opts in _GROUPS:
        conf.register_opts(opts, group=group)


def build_conf(
    prog: str,
    register: Callable[[cfg.ConfigOpts], None],
    args: Sequence[str] = (),
    *,
    config_files: Sequence[str] | None = None,
    overrides: dict[str, object] | None = None,
) -> cfg.ConfigOpts:
    """A parsed private ``ConfigOpts`` for one qsnap service (agent or API).

    ``register`` adds the service's own options; oslo.messaging's (including the tracing and
    metrics groups it registers only on the global CONF) and oslo.log's are always added, so
    several services can live in one process without sharing state. ``overrides`` maps
    ``"group.name"`` (or ``"name"`` for [DEFAULT]) to a value; for tests.
    """
    conf = cfg.ConfigOpts()
    register(conf)
    register_messaging_opts(conf)
    oslo_log.register_options(conf)
    conf(
        list(args),
        project="qsnap",
        prog=prog,
        default_config_files=list(config_files) if config_files is not None else [],
        default_config_dirs=[],
    )
    for key, value in (overrides or {}).items():
        group, _, name = key.rpartition(".")
        conf.set_override(name, value, group=group or None)
    return conf


def make_conf(
    args: Sequence[str] = (),
    *,
    config_files: Sequence[str] | None = None,
    overrides: dict[str, object] | None = None,
) -> cfg.ConfigOpts:
    """The agent's parsed private ``ConfigOpts`` (see :func:`build_conf`)."""
    return build_conf(
        "qsnap-agent", register_opts, args, config_files=config_files, overrides=overrides
    )
