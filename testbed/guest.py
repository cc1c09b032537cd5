"""A real TCG guest with a real qemu-ga, booted by libvirt, with volume disks on a share.

Disks are named ``volume-<uuid>`` with ``<serial>`` = the uuid, as Nova attaches Cinder
volumes. Readiness is the agent-lifecycle CONNECTED event, never a guest-ping loop.
Commands run in the guest through guest-exec.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu

from libvirt_ops import Connection, find_disk
from testbed import procs
from testbed.guestimage import GuestImage
from testbed.records import RecordLog, parse_records

AGENT_CONNECTED = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
AGENT_DISCONNECTED = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED


class GuestError(RuntimeError):
    """The guest did not do what the test bed asked within its deadline."""


@dataclass(frozen=True)
class GuestDisk:
    target: str
    volume_id: str
    path: Path
    mountpoint: str
    fmt: str = "qcow2"


@dataclass(frozen=True)
class ExecResult:
    rc: int
    stdout: bytes
    stderr: bytes


class _EventLatch:
    """Collects one domain's agent and lifecycle events so waits are race-free."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.agent_state: int | None = None
        self.stopped_detail: int | None = None

    def agent(self, state: int) -> None:
        with self.cond:
            self.agent_state = state
            self.cond.notify_all()

    def lifecycle(self, event: int, detail: int) -> None:
        with self.cond:
            if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                self.stopped_detail = detail
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise GuestError(f"timed out after {timeout:.0f}s waiting for {what}")


class _Dispatcher:
    """One subscription per event kind per connection, fanned out to guests by UUID."""

    _lock = threading.Lock()
    _by_conn: dict[int, _Dispatcher] = {}

    def __init__(self, conn: Connection) -> None:
        self.latches: dict[str, _EventLatch] = {}
        conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent)
        conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle)

    @classmethod
    def of(cls, conn: Connection) -> _Dispatcher:
        with cls._lock:
            d = cls._by_conn.get(id(conn))
            if d is None:
                d = cls._by_conn[id(conn)] = cls(conn)
            return d

    def _on_agent(self, _c: Any, dom: Any, state: int, _reason: int, _o: Any) -> None:
        latch = self.latches.get(dom.UUIDString())
        if latch:
            latch.agent(state)

    def _on_lifecycle(self, _c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
        latch = self.latches.get(dom.UUIDString())
        if latch:
            latch.lifecycle(event, detail)


def domain_xml(
    name: str,
    dom_uuid: str,
    image: GuestImage,
    disks: list[GuestDisk],
    console: Path,
    memory_mib: int = 256,
) -> str:
    """The test guest: q35, TCG, direct kernel boot, virtio disks with serials, qemu-ga channel."""
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{d.fmt}'/>
      <source file='{escape(str(d.path))}'/>
      <target dev='{d.target}' bus='virtio'/>
      <serial>{d.volume_id}</serial>
    </disk>"""
        for d in disks
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{dom_uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(image.cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <serial type='file'>
      <source path='{escape(str(console))}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


class Guest:
    """A booted guest; ``close()`` destroys it if it is still running."""

    def __init__(
        self,
        conn: Connection,
        image: GuestImage,
        directory: Path,
        *,
        ndisks: int = 2,
        size_mib: int = 256,
        disk_fmt: str = "qcow2",
        boot_timeout: float = 90.0,
    ) -> None:
        from testbed.disks import create_volume

        disks = []
        for i in range(ndisks):
            vol = str(uuid.uuid4())
            path = create_volume(directory, vol, size_mib, disk_fmt)
            mount = "/data" if i == 0 else f"/data{i + 1}"
            disks.append(GuestDisk(f"vd{chr(ord('a') + i)}", vol, path, mount, disk_fmt))
        self._boot(conn, image, directory, disks, directory, boot_timeout)

    def _boot(
        self,
        conn: Connection,
        image: GuestImage,
        directory: Path,
        disks: list[GuestDisk],
        console_dir: Path,
        boot_timeout: float,
    ) -> None:
        self.conn = conn
        self.dir = directory
        self.uuid = str(uuid.uuid4())
        self.name = f"qsnap-{procs.run_id()}-{self.uuid[:8]}"
        self.console = console_dir / f"{self.name}.console"
        self.disks = disks
        self._latch = _EventLatch()
        self._dispatch = _Dispatcher.of(conn)
        self._dispatch.latches[self.uuid] = self._latch
        xml = domain_xml(self.name, self.uuid, image, self.disks, self.console)
        t0 = time.monotonic()
        self._dom = conn.get().createXML(xml, 0)
        self._dom_gen = conn.generation
        try:
            self.wait_agent(boot_timeout)
        except GuestError as exc:
            tail = self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""
            self.destroy()
            raise GuestError(f"{exc}; console tail:\n{tail}") from exc
        self.boot_to_agent_s = time.monotonic() - t0

    @property
    def dom(self) -> libvirt.virDomain:
        """The domain handle, looked up again after the connection was reopened (a handle
        from before a libvirtd restart is dead)."""
        if self._dom_gen != self.conn.generation:
            self._dom = self.conn.get().lookupByUUIDString(self.uuid)
            self._dom_gen = self.conn.generation
        return self._dom

    # -- agent ---------------------------------------------------------------------------
    def wait_agent(self, timeout: float = 30.0) -> None:
        """Wait for the agent-lifecycle CONNECTED event (or an already connected agent)."""
        self._latch.wait(
            lambda: self._latch.agent_state == AGENT_CONNECTED, timeout, f"qemu-ga in {self.name}"
        )

    def wait_agent_gone(self, timeout: float = 30.0) -> None:
        self._latch.wait(
            lambda: self._latch.agent_state == AGENT_DISCONNECTED,
            timeout,
            f"qemu-ga in {self.name} to disconnect",
        )

    def agent(self, cmd: str, args: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        """Run one raw qemu-ga command; returns its ``return`` value."""
        req: dict[str, Any] = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        out = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(req), timeout, 0)
        return json.loads(out).get("return") if out else None

    def run(self, argv: list[str], timeout: float = 30.0, input: bytes | None = None) -> ExecResult:
        """Run a command in the guest (guest-exec) and wait for it to exit."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = self.agent("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            st = self.agent("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return ExecResult(
                    int(st.get("exitcode", -1 if st.get("signal") else 0)),
                    base64.b64decode(st.get("out-data", "")),
                    base64.b64decode(st.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise GuestError(f"{argv} still running after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def check(self, argv: list[str], timeout: float = 30.0) -> bytes:
        """Like run(), but a non-zero exit is an error carrying stderr."""
        res = self.run(argv, timeout)
        if res.rc != 0:
            raise GuestError(f"{argv} exited {res.rc}: {res.stderr.decode(errors='replace')}")
        return res.stdout

    def read_file(self, path: str) -> bytes:
        handle = self.agent("guest-file-open", {"path": path, "mode": "r"})
        chunks = []
        try:
            while True:
                got = self.agent("guest-file-read", {"handle": handle, "count": 256 << 10})
                chunks.append(base64.b64decode(got.get("buf-b64", "")))
                if got.get("eof") or not got.get("count"):
                    break
        finally:
            self.agent("guest-file-close", {"handle": handle})
        return b"".join(chunks)

    def write_file(self, path: str, data: bytes) -> None:
        handle = self.agent("guest-file-open", {"path": path, "mode": "w"})
        try:
            for off in range(0, len(data), 48 << 10):
                self.agent(
                    "guest-file-write",
                    {
                        "handle": handle,
                        "buf-b64": base64.b64encode(data[off : off + (48 << 10)]).decode(),
                    },
                )
            self.agent("guest-file-flush", {"handle": handle})
        finally:
            self.agent("guest-file-close", {"handle": handle})

    def sha256(self, path: str) -> str:
        """A file's SHA-256 as read from the disk: page cache dropped first."""
        self.check(["/bin/sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        return bytes(self.check(["sha256sum", path])).split()[0].decode()

    def guest_time_ns(self) -> int:
        return int(self.agent("guest-get-time"))

    def chain(self, volume_id: str | None = None) -> list[str]:
        """Basenames of a disk's live chain (libvirt's XML), top first; the first disk's
        by default."""
        disk = find_disk(self.dom, volume_id=volume_id or self.disks[0].volume_id)
        return [os.path.basename(layer.path) for layer in disk.chain]

    # -- workload ------------------------------------------------------------------------
    def start_writers(
        self, interval_ms: int = 10, sync_every: int = 1, mounts: list[str] | None = None
    ) -> None:
        """One self-checking record writer per filesystem (``MOUNT/records``)."""
        self.check(
            ["/usr/bin/qsnap-writers-start", str(interval_ms), str(sync_every), *(mounts or [])]
        )

    def stop_writers(self) -> None:
        self.check(["/usr/bin/qsnap-writers-stop"])

    def records(self, mount: str = "/data") -> RecordLog:
        return parse_records(self.read_file(f"{mount}/records"), allow_torn_tail=True)

    # -- life ----------------------------------------------------------------------------
    def is_running(self) -> bool:
        try:
            return bool(self.dom.isActive())
        except libvirt.libvirtError:
            return False

    def shutdown(self, timeout: float = 60.0) -> int:
        """Clean shutdown through the agent; returns libvirt's STOPPED detail."""
        self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        self._latch.wait(
            lambda: self._latch.stopped_detail is not None, timeout, f"{self.name} to shut down"
        )
        assert self._latch.stopped_detail is not None
        return self._latch.stopped_detail

    def destroy(self) -> None:
        if self.is_running():
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass
        self._dispatch.latches.pop(self.uuid, None)

    def close(self) -> None:
        self.destroy()


class VolumeGuest(Guest):
    """A guest booted on EXISTING volume files (Cinder's), not bed-made ones; its console
    log goes to ``logdir``, not the share, so listings of the share stay exact."""

    def __init__(
        self,
        conn: Connection,
        image: GuestImage,
        disks: list[GuestDisk],
        logdir: Path,
        boot_timeout: float = 90.0,
    ) -> None:
        self._boot(conn, image, disks[0].path.parent, disks, logdir, boot_timeout)


class GuestFactory:
    """Boots guests on demand and destroys every one of them on ``close()``."""

    def __init__(self, conn: Connection, image: GuestImage, default_dir: Any) -> None:
        self._conn = conn
        self._image = image
        self._default_dir = default_dir
        self.guests: list[Guest] = []

    def __call__(
        self, ndisks: int = 2, size_mib: int = 256, share: Any = None, disk_fmt: str = "qcow2"
    ) -> Guest:
        directory = share.new_dir("guest") if share is not None else self._default_dir()
        g = Guest(
            self._conn, self._image, directory, ndisks=ndisks, size_mib=size_mib, disk_fmt=disk_fmt
        )
        self.guests.append(g)
        return g

    def close(self) -> None:
        for g in self.guests:
            g.close()
        self.guests.clear()
