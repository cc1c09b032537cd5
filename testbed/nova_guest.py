"""The test-bed side of a server that Nova runs: its domain's guest agent and its share.

``NovaGuest`` is the bed's :class:`testbed.guest.Guest` API (run, check, read_file,
write_file, writers, records) bound to a domain Nova created, found by UUID each time: Nova
undefines and redefines the domain on a hard reboot or a start, so a handle is never kept.
Nova owns the domain: ``close()`` leaves it alone. ``LoopShare`` is the "dir" share on its own
filesystem (a loop-mounted ext4 image) so that Nova's bind "mount" of it is a real mount point
(``os.path.ismount``), as an NFS mount would be; tmpfs is no option, it refuses O_DIRECT.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from libvirt_ops import Connection, domain_disks, wait_agent_connected, wait_agent_state
from testbed import procs
from testbed.guest import Guest, GuestDisk, GuestError, _Dispatcher, _EventLatch


class NovaGuest(Guest):
    """Guest-agent access to the domain of Nova instance ``instance_uuid``."""

    def __init__(self, conn: Connection, instance_uuid: str, directory: Path) -> None:
        self.conn = conn
        self.uuid = instance_uuid
        self.dir = directory
        self.name = self.dom.name()
        self.console = directory / "console.log"
        self._latch = _EventLatch()
        self._dispatch = _Dispatcher.of(conn)
        self._dispatch.latches[self.uuid] = self._latch
        self.disks = []
        self.refresh_disks()

    @property
    def dom(self) -> libvirt.virDomain:
        """Looked up by UUID on every use (Nova recreates the domain on hard reboot/start)."""
        return self.conn.get().lookupByUUIDString(self.uuid)

    def domain_id(self) -> int:
        """libvirt's runtime id: a new QEMU process gets a new one (-1 when shut off)."""
        try:
            return int(self.dom.ID())
        except libvirt.libvirtError:
            return -1

    def refresh_disks(self) -> list[GuestDisk]:
        """``disks`` from the live XML (target, serial, top file, format), vda first."""
        disks = []
        for d in sorted(domain_disks(self.dom), key=lambda d: d.target):
            if d.serial and d.chain:
                top = d.chain[0]
                disks.append(GuestDisk(d.target, d.serial, Path(top.path), "", top.fmt))
        self.disks = disks
        return disks

    def wait_agent(self, timeout: float = 60.0) -> None:
        try:
            wait_agent_connected(self.conn, self.dom, timeout)
        except Exception as exc:
            raise GuestError(f"qemu-ga of {self.name}: {exc}; {self.console_tail()}") from exc

    def wait_agent_gone(self, timeout: float = 30.0) -> None:
        wait_agent_state(self.conn, self.dom, connected=False, timeout=timeout)

    def console_tail(self, n: int = 3000) -> str:
        try:
            return "console tail:\n" + self.console.read_text(errors="replace")[-n:]
        except OSError:
            return "(no console log)"

    def device_of(self, volume_id: str, timeout: float = 30.0) -> str:
        """The guest's ``/dev/vdX`` whose virtio serial is the volume id (20 chars kept)."""
        serial = volume_id[:20]
        script = (
            'for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = '
            f"{shlex.quote(serial)} ] && echo ${{b##*/}}; done; true"
        )
        deadline = time.monotonic() + timeout
        while True:  # a hot-plugged disk shows up a moment after libvirt's attach returns
            out = self.check(["/bin/sh", "-c", script]).decode().split()
            if out:
                return f"/dev/{out[0]}"
            if time.monotonic() > deadline:
                raise GuestError(f"no disk with serial {serial} in {self.name}")
            time.sleep(0.3)

    def mount_volume(self, volume_id: str, mountpoint: str, *, mkfs: bool = True) -> str:
        """Format (busybox mke2fs: ext2, mounted by the ext4 driver) and mount a hot-plugged
        volume; the guest's init mounts disks only at boot. Returns its device."""
        dev = self.device_of(volume_id)
        script = f"mkdir -p {shlex.quote(mountpoint)}"
        if mkfs:
            script += f" && mke2fs -q {dev}"
        script += f" && mount {dev} {shlex.quote(mountpoint)}"
        self.check(["/bin/sh", "-c", script], timeout=120)
        return dev

    def write_marker(self, path: str, text: str) -> None:
        """A file written and synced (to the volume, not only the page cache)."""
        self.write_file(path, text.encode())
        self.check(["/bin/sync"])

    def close(self) -> None:
        """Nova owns the domain: only stop listening for its events."""
        self._dispatch.latches.pop(self.uuid, None)


@dataclass
class Server:
    """A server booted through Nova's API from a Cinder volume."""

    id: str
    root_volume_id: str
    domain_name: str
    guest: NovaGuest
    volumes: list[str] = field(default_factory=list)  # attached after boot, in order


class LoopShare:
    """A directory share on its own ext4 filesystem (a sparse loop-mounted image)."""

    kind = "dir"

    def __init__(self, size_mib: int = 8192) -> None:
        self._base = procs.run_dir() / f"loop-share-{uuid.uuid4().hex[:6]}"
        self._base.mkdir(mode=0o755)
        self._image = self._base / "fs.img"
        self.root = self._base / "mnt"
        self.root.mkdir(mode=0o755)
        with open(self._image, "wb") as f:
            f.truncate(size_mib << 20)
        try:
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self._image)])
            _run(["mount", "-o", "loop", str(self._image), str(self.root)])
            self.root.chmod(0o755)
        except BaseException:
            self.close()
            raise

    def new_dir(self, prefix: str) -> Path:
        d = self.root / f"{prefix}-{uuid.uuid4().hex[:6]}"
        d.mkdir(mode=0o755)
        return d

    def close(self) -> None:
        unmount_all(self.root)
        shutil.rmtree(self._base, ignore_errors=True)


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{argv!r} failed rc={res.returncode}: {res.stderr.strip()}")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest (most recent) first."""
    prefix = str(path)
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt = line.split()[1].replace("\\040", " ")
        if mnt == prefix or mnt.startswith(prefix + "/"):
            found.append(mnt)
    return list(reversed(found))


def unmount_all(path: Path) -> list[str]:
    """Unmount everything at or below ``path`` (a lazy unmount if a plain one fails, e.g. a
    QEMU that was killed a moment ago still holds it); what was mounted."""
    found = mounts_under(path)
    for mnt in found:
        res = subprocess.run(["umount", mnt], capture_output=True, timeout=60)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60)
    return found


def destroy_domains(conn: Connection, prefix: str) -> None:
    """Whatever Nova left (a server it could not delete): destroy and undefine by name."""
    for dom in conn.get().listAllDomains(0):
        if dom.name().startswith(prefix):
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                continue  # best effort: the leftover audit reports what stays


def clean_base(base: Path, keep: str) -> None:
    """Remove a bed directory but ``keep`` (the logs, for post-mortems) and any mount."""
    for entry in base.iterdir() if base.exists() else ():
        if entry.name == keep or mounts_under(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
