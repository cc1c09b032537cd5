"""Assembly of the real agent: config, libvirt, journal, Cinder notifier, RPC server.

Everything long-lived is built here and nowhere else, so the service itself stays a plain
object over injected parts (faked in unit tests). SIGTERM/SIGINT stop the RPC server first
(no new work), then the pool drains, then notices and libvirt are closed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import libvirt

from hostagent import service_api as api
from hostagent._notify_queue import NotifyQueue
from hostagent._pool import KeyedPool
from hostagent.config import make_conf
from hostagent.inventory import InventoryTracker, read_attachments
from hostagent.journal import Journal
from hostagent.notifier import (
    AuthSettings,
    CinderNotifier,
    NoAuthSettings,
    NoneAuthSettings,
    PasswordSettings,
    RetryPolicy,
)
from hostagent.recovery import reconcile
from hostagent.rpc_server import serve
from hostagent.rpcapi import InventoryFanout, get_transport
from hostagent.service import AssistedService, Located
from libvirt_ops import (
    Connection,
    Deadlines,
    DiskSnapshotSpec,
    JobOptions,
    LibvirtOpsError,
    QuiescePolicy,
    SnapshotRequest,
    agent_command,
    commit,
    domain_disks,
    flatten,
    pull,
    take_snapshot,
)

LOG = logging.getLogger(__name__)


class LibvirtHypervisor:
    """:class:`hostagent.service.Hypervisor` on a real libvirt connection."""

    def __init__(
        self, conn: Connection, host: str, *, roots: list[str], freeze: float, merge: float
    ) -> None:
        self._conn = conn
        self._host = host
        self._roots = roots
        self._freeze = freeze
        self._merge = merge

    def locate(self, volume_id: str) -> Located:
        hits: list[Located] = []
        for dom in self._conn.get().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                disks, dom_uuid = domain_disks(dom), dom.UUIDString()
            except libvirt.libvirtError:
                continue  # vanished between list and read
            hits += [Located(dom_uuid, d) for d in disks if (d.serial or "").lower() == volume_id]
        if not hits:
            raise api.VolumeNotFound(f"volume {volume_id} is not attached on {self._host}")
        if len(hits) > 1:
            raise api.InvalidRequest(f"volume {volume_id} is attached {len(hits)} times here")
        return hits[0]

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]:
        spec = DiskSnapshotSpec(new_file, volume_id=where.disk.serial, reuse_existing=True)
        request = SnapshotRequest(
            where.domain_uuid,
            (spec,),
            quiesce=QuiescePolicy.PREFER,  # Nova's behaviour: quiesce, else crash-consistent
            deadlines=Deadlines(max_frozen=self._freeze),
        )
        res = take_snapshot(self._conn, request, roots=self._roots)
        return {
            "quiesced": res.quiesced,
            "fallback_reason": res.fallback_reason,
            "chain": [layer.path for layer in res.disks[0].chain],
        }

    def merge(
        self,
        where: Located,
        file_to_merge: str | None,
        merge_target_file: str | None,
        progress: Callable[[int, int], None],
    ) -> dict[str, Any]:
        dom = self._conn.lookup(where.domain_uuid)
        opts = JobOptions(timeout=self._merge, progress=progress)
        target, roots = where.disk.target, self._roots
        if merge_target_file is not None:
            assert file_to_merge is not None
            res = commit(
                self._conn, dom, target, top=file_to_merge, base=merge_target_file,
                roots=roots, options=opts,
            )  # fmt: skip
        elif file_to_merge is None:
            res = flatten(self._conn, dom, target, roots=roots, options=opts)
        else:
            res = pull(self._conn, dom, target, base=file_to_merge, roots=roots, options=opts)
        return {
            "kind": res.kind.value,
            "chain_after": list(res.chain_after),
            "merged_away": list(res.merged_away),
        }

    def inventory(self) -> api.Inventory:
        return api.Inventory(self._host, read_attachments(self._conn.get()))

    def block_job(self, where: Located) -> dict[str, int]:
        """For recovery: the disk's running block job (empty when none)."""
        info = self._conn.lookup(where.domain_uuid).blockJobInfo(where.disk.target, 0)
        return dict(info) if info else {}

    def thaw_if_frozen(self, domain_uuid: str) -> bool:
        """For recovery: a guest we may have frozen before a crash is thawed now."""
        dom = self._conn.lookup(domain_uuid)
        try:
            if agent_command(dom, "guest-fsfreeze-status") != "frozen":
                return False
            dom.fsThaw()
        except (LibvirtOpsError, libvirt.libvirtError) as exc:
            LOG.warning("freeze state of %s unknown: %s", domain_uuid, exc)
            return False
        return True


def cinder_auth(conf: Any) -> AuthSettings:
    """The notifier's auth from the [cinder] group."""
    c = conf.cinder
    if c.auth_type == "noauth":
        if not (c.endpoint and c.project_id):
            raise ValueError("[cinder] noauth needs endpoint and project_id")
        return NoAuthSettings(c.endpoint, c.project_id, c.user_id or "qsnap")
    if c.auth_type == "none":
        if not c.endpoint:
            raise ValueError("[cinder] auth_type=none needs endpoint")
        return NoneAuthSettings(c.endpoint)
    return PasswordSettings(
        c.auth_url, c.username, c.password, c.project_name, c.user_domain_name,
        c.project_domain_name, c.region_name,
    )  # fmt: skip


def main(config_files: Sequence[str], *, ready: Callable[[], None] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    conf = make_conf(config_files=config_files)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.makedirs(conf.state_path, mode=0o700, exist_ok=True)
    roots = list(conf.shares.allowed_roots)
    conn = Connection(conf.libvirt.uri, open_timeout=conf.libvirt.open_timeout)
    journal = Journal(os.path.join(conf.state_path, "journal.sqlite"), host=conf.host)
    retry = RetryPolicy(deadline=30.0, request_timeout=conf.cinder.timeout)
    queue = NotifyQueue(journal, CinderNotifier(cinder_auth(conf), retry))
    pool = KeyedPool(conf.agent.workers)
    hv = LibvirtHypervisor(
        conn,
        conf.host,
        roots=roots,
        freeze=conf.agent.freeze_timeout,
        merge=conf.agent.merge_timeout,
    )
    service = AssistedService(journal, hv, queue, pool, roots=roots)
    transport = get_transport(conf)
    tracker = InventoryTracker(
        conn, conf.host, InventoryFanout(transport), interval=conf.agent.inventory_interval
    )
    # before any request is served and before the queue's first pass delivers what it owes
    reconcile(
        journal, hv, queue, submit=pool.submit, roots=roots, job_timeout=conf.agent.merge_timeout
    )
    queue.start()  # resends what an earlier run left pending
    tracker.start()
    try:
        serve(conf, service, ready=ready or (lambda: LOG.info("qsnap-agent %s ready", conf.host)))
    finally:
        pool.shutdown(wait=True)
        tracker.stop()
        queue.stop()
        transport.cleanup()
        journal.close()
        conn.close()
    return 0
