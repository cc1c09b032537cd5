"""Checks the Nova coherence tests share (not a test module): every record of a volume's
active file agrees, the guest's records survive a restart, snapshots keep their data.

A check raises :class:`Incoherent` with what disagreed, so a negative control can assert
that it fires.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostagent.rpc import contract as api
from libvirt_ops import find_disk
from testbed import procs
from testbed.agent import AgentProcess, noauth_cinder
from testbed.disks import image_sha256
from testbed.guest import GuestError
from testbed.nova import NovaCloud
from testbed.nova_guest import Server
from testbed.records import RecordLog

#: Qemu-ga's mount points of the two data volumes, by kind.
MOUNTS = {"raw": "/r", "qcow2": "/q"}
#: nova-compute's driver, through the shim tools/nova_setup.sh installs.
QSNAP_DRIVER = "qsnap.QsnapLibvirtDriver"


@contextmanager
def agent_beside_nova(cloud: NovaCloud, host: str) -> Iterator[AgentProcess]:
    """The qsnap agent beside nova-compute, on Nova's RabbitMQ, ``[nova] enabled``, named
    ``host`` (nova.conf's ``[qsnap] agent_host``); it must exit 0 when closed."""
    logdir = procs.run_dir() / f"nova-agent-{uuid.uuid4().hex[:6]}"
    logdir.mkdir(mode=0o755)
    agent = AgentProcess(
        logdir, cloud.rabbit_url, str(cloud.base / "mnt"), host=host, rpc_timeout=60,
        conf={
            "agent": {"workers": 2, "merge_timeout": 300},
            "cinder": noauth_cinder(cloud.cinder, user_id="qsnap-agent"),
            "nova": {"enabled": True, "ping_timeout": 5},
        },
    )  # fmt: skip
    try:
        agent.start()
        yield agent
    finally:
        rc = agent.close()
        assert rc == 0, f"qsnap-agent exited {rc}: {agent.tail()}"


@dataclass
class NovaBed:
    """What a Nova module's tests share in order: the cloud, the agent beside it, the server
    the first test boots and its data volumes (``"raw"``/``"qcow2"`` -> volume id)."""

    cloud: NovaCloud
    agent: AgentProcess
    server: Server | None = None
    vols: dict[str, str] = field(default_factory=dict)

    @property
    def srv(self) -> Server:
        assert self.server is not None, "the first test of the module boots the server"
        return self.server

    def all_volumes(self) -> list[str]:
        return [self.srv.root_volume_id, *self.vols.values()]

    def op(self, started: api.Operation) -> api.Operation:
        """Wait for the agent's operation; it must succeed."""
        done = self.agent.wait(started, timeout=300)
        assert done.state is api.OperationState.SUCCEEDED, (done.error, self.agent.tail())
        return done

    def restart_writers(self) -> None:
        """After a restart: mount the volumes again (never formatting) and write on."""
        for kind, vid in self.vols.items():
            ensure_mounted(self.srv, vid, MOUNTS[kind])
        self.srv.guest.start_writers(mounts=list(MOUNTS.values()))


class Incoherent(AssertionError):
    """Two records of the same volume disagree, or data written before a restart is gone."""


def agree(cloud: NovaCloud, server: Server, volumes: Iterable[str], when: str) -> None:
    """Nova's BDM, Cinder's attachment, os-initialize_connection, ``.info`` and the live XML
    name the same file, each with that file's real format."""
    problems = []
    for vid in volumes:
        views = cloud.views(server, vid)
        if len(set(views.values())) != 1:
            problems.append(f"volume {vid}: {views}")
    if problems:
        raise Incoherent(f"after {when}: " + "; ".join(problems))


def ensure_mounted(server: Server, volume_id: str, mountpoint: str) -> None:
    """After a restart the guest's init mounts only its boot disk: mount the volume again
    (never formatting it)."""
    mounts = server.guest.check(["/bin/cat", "/proc/mounts"]).decode()
    if f" {mountpoint} " not in mounts:
        server.guest.mount_volume(volume_id, mountpoint, mkfs=False)


def stop_and_read(server: Server, mounts: Iterable[str]) -> dict[str, RecordLog]:
    """Writers stopped (their records synced), then every record file read."""
    server.guest.stop_writers()
    server.guest.check(["/bin/sync"])
    return {m: server.guest.records(m) for m in mounts}


def survived(before: Mapping[str, RecordLog], server: Server, when: str) -> None:
    """Every record read before the restart is there after it, in order, nothing torn."""
    lost = []
    for mount, old in before.items():
        try:
            new = server.guest.records(mount)
        except GuestError as exc:
            lost.append(f"{mount}: unreadable ({exc})")
            continue
        if not old.is_prefix_of(new) or not new.clean:
            lost.append(f"{mount}: {old.count} records before, {new.count} after {new.problems}")
    if lost:
        raise Incoherent(f"after {when}: " + "; ".join(lost))


def point_in_time(cloud: NovaCloud, volume_id: str, snapshot_id: str) -> str:
    """SHA-256 of the guest view a snapshot froze: the chain below its overlay (remotefs:
    snapshot S's data is the backing file of ``volume-<vid>.<S>``)."""
    overlay = cloud.volume_path(volume_id, f"volume-{volume_id}.{snapshot_id}")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(overlay)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    backing = overlay.parent / os.path.basename(info["backing-filename"])
    return image_sha256(backing, str(info["backing-filename-format"]))


def qemu_img_check(cloud: NovaCloud, volume_id: str) -> None:
    """``qemu-img check`` of every qcow2 file of the volume (the guest is shut off)."""
    directory = cloud.volume_path(volume_id, f"volume-{volume_id}").parent
    for path in sorted(Path(directory).glob(f"volume-{volume_id}*")):
        if path.suffix == ".info":
            continue
        fmt = cloud.file_format(volume_id, path.name)
        if fmt != "qcow2":
            continue
        res = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", str(path)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            raise Incoherent(f"qemu-img check {path.name}: {res.stdout}{res.stderr}")


def snapshot_beside_nova(cloud: NovaCloud, server: Server, volume_id: str) -> str:
    """What qsnap did before this issue: an external snapshot taken beside Nova, ``.info``
    updated, Nova's side never told (the negative control's stale BDM). The snapshot id."""
    from testbed.layers import snapshot_disk

    disk = next(d for d in server.guest.refresh_disks() if d.volume_id.startswith(volume_id[:20]))
    new = snapshot_disk(server.guest.dom, disk.target, volume_id)
    sid = new.name.rsplit(".", 1)[1]
    uuid.UUID(sid)
    info = new.parent / f"volume-{volume_id}.info"
    ledger: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}
    ledger.update({"active": new.name, sid: new.name})
    info.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    return sid


def ledger(cloud: NovaCloud, volume_id: str) -> dict[str, str]:
    """Cinder's ``volume-<vid>.info`` (snapshot id -> file, and ``active``); {} before the
    volume's first snapshot."""
    p = cloud.volume_path(volume_id, f"volume-{volume_id}.info")
    return dict(json.loads(p.read_text())) if p.exists() else {}


def chain_recorded(cloud: NovaCloud, server: Server, volumes: Iterable[str], when: str) -> None:
    """Every layer of each live chain is the volume's base file or a file the ledger names:
    a layer nobody recorded is one a hard reboot (rebuilt from the BDM) would drop."""
    problems = []
    for vid in volumes:
        names = [os.path.basename(c.path) for c in find_disk(server.guest.dom, volume_id=vid).chain]
        known = {f"volume-{vid}", *ledger(cloud, vid).values()}
        if stray := [n for n in names if n not in known]:
            problems.append(f"volume {vid}: unrecorded {stray} in {names}")
    if problems:
        raise Incoherent(f"after {when}: " + "; ".join(problems))


def backup_temporaries(directory: Path) -> list[str]:
    """Files of an earlier backup design (``*.qsnap-bk-*`` overlays) in a share directory:
    the checkpoint design must never make one."""
    return sorted(p.name for p in directory.glob("*.qsnap-bk-*"))


def records_now(server: Server, mounts: Iterable[str]) -> dict[str, RecordLog]:
    """Every record file read while its writer runs (a torn tail allowed): what
    :func:`survived` compares after a step that must not stop the guest's writes."""
    return {m: server.guest.records(m) for m in mounts}
