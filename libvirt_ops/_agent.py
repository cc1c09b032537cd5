"""Guest-agent calls with bounded waits, and which guest filesystems live on which disks.

Why a module of its own: every agent call can hang (a frozen or dead qemu-ga), so each one
here has a deadline; and freezing only the filesystems of the disks being snapshotted needs
a trustworthy map from domain disks to guest mountpoints. qemu-ga reports, per filesystem,
the serial and PCI address of the disks under it; the domain XML has the same ``<serial>``
and ``<address>``, so the two are joined here. An entry that cannot be joined is reported as
unmapped: callers must then assume it may sit on any disk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
from lxml import etree

from libvirt_ops._connection import Connection
from libvirt_ops.errors import AgentUnavailable, LibvirtOpsError, Timeout

AGENT_CHANNEL = "org.qemu.guest_agent.0"
VIRTIO_SERIAL_MAX = 20

_UNREACHABLE = {
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    getattr(libvirt, "VIR_ERR_AGENT_UNSYNCED", -1),
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
}

T = TypeVar("T")


class AgentCommandFailed(LibvirtOpsError):
    """qemu-ga answered, with an error (e.g. freezing an already frozen guest)."""


def agent_error(exc: libvirt.libvirtError, what: str) -> LibvirtOpsError:
    """Unreachable agent -> AgentUnavailable; an error answered by the guest -> failed."""
    code = exc.get_error_code()
    msg = exc.get_error_message() or str(exc)
    if code in _UNREACHABLE or "not connected" in msg or "not responding" in msg:
        return AgentUnavailable(f"{what}: {msg}")
    return AgentCommandFailed(f"{what}: {msg}")


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking libvirt call on a helper thread and stop waiting at the deadline.

    libvirt's own agent calls wait as long as the domain's agent timeout says (by default:
    forever once guest-sync passed). We cannot cancel them, but we can stop waiting; the
    late call finishes (or not) on its daemon thread. Freeze callers pair this with the thaw
    watchdog so a freeze that lands late is still undone.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"agent-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise Timeout(f"{what}: no answer within {timeout:.1f} s")
    if "error" in box:
        err = box["error"]
        if isinstance(err, libvirt.libvirtError):
            raise agent_error(err, what) from err
        raise err
    value: T = box["value"]
    return value


def agent_command(
    dom: libvirt.virDomain,
    command: str,
    arguments: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
) -> Any:
    """One raw qemu-ga command; returns its ``return`` value. Bounded by ``timeout``."""
    payload: dict[str, Any] = {"execute": command}
    if arguments is not None:
        payload["arguments"] = arguments
    secs = max(1, int(timeout + 0.999))
    try:
        raw = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), secs, 0)
    except libvirt.libvirtError as exc:
        raise agent_error(exc, command) from exc
    if raw is None:
        raise AgentCommandFailed(f"{command}: no reply")
    return json.loads(raw).get("return")


def agent_connected(dom: libvirt.virDomain) -> bool:
    """True if libvirt sees qemu-ga's virtio-serial port open (from the live XML)."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for target in root.findall("./devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def wait_agent_state(
    conn: Connection, dom: libvirt.virDomain, *, connected: bool, timeout: float
) -> None:
    """Wait for the AGENT_LIFECYCLE event to report ``connected`` (or disconnected).

    Subscribes before reading the current state, so an event between the two is not lost.
    Raises :class:`Timeout` at the deadline.
    """
    want = (
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
        if connected
        else libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED
    )
    uuid = dom.UUIDString()
    hit = threading.Event()

    def on_event(_c: Any, d: libvirt.virDomain, state: int, _reason: int, _o: Any) -> None:
        if d.UUIDString() == uuid and state == want:
            hit.set()

    key = conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, on_event)
    try:
        if agent_connected(dom) == connected:
            return
        if not hit.wait(timeout):
            word = "connect" if connected else "disconnect"
            raise Timeout(f"guest agent of {dom.name()} did not {word} within {timeout:.1f} s")
    finally:
        conn.unsubscribe(key)


def wait_agent_connected(conn: Connection, dom: libvirt.virDomain, timeout: float) -> None:
    """Wait (by event, never by polling guest-ping) until qemu-ga is connected."""
    wait_agent_state(conn, dom, connected=True, timeout=timeout)


@dataclass(frozen=True)
class _XmlDisk:
    target: str
    serial: str | None
    pci: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class GuestFilesystem:
    """A mounted guest filesystem and the domain disk targets it lives on.

    ``mapped`` is False when at least one of its disks could not be matched to the domain
    XML: such a filesystem may live on any disk.
    """

    mountpoint: str
    fstype: str
    name: str
    targets: tuple[str, ...]
    mapped: bool


def _xml_disks(xml: str) -> list[_XmlDisk]:
    root = etree.fromstring(xml.encode())
    out: list[_XmlDisk] = []
    for el in root.findall("./devices/disk"):
        tgt = el.find("target")
        if tgt is None or tgt.get("dev") is None:
            continue
        ser = el.find("serial")
        addr = el.find("address")
        pci: tuple[int, int, int, int] | None = None
        if addr is not None and addr.get("type") == "pci":
            d, b, s_, f = (int(addr.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
            pci = (d, b, s_, f)
        serial = ser.text.strip() if ser is not None and ser.text else None
        out.append(_XmlDisk(tgt.get("dev", ""), serial, pci))
    return out


def _match(agent_disk: dict[str, Any], disks: list[_XmlDisk]) -> str | None:
    """The domain target of one guest-get-fsinfo disk: by serial first, then PCI address."""
    serial = agent_disk.get("serial")
    if serial:
        # virtio-blk cuts serials to 20 bytes: a Cinder volume UUID arrives as its prefix.
        hits = [d.target for d in disks if d.serial and d.serial == serial]
        if not hits and len(serial) == VIRTIO_SERIAL_MAX:
            hits = [d.target for d in disks if d.serial and d.serial.startswith(serial)]
        if len(hits) == 1:
            return hits[0]
    ctl = agent_disk.get("pci-controller") or {}
    if agent_disk.get("bus-type") == "virtio" and ctl:
        pci = tuple(int(ctl.get(k, -1)) for k in ("domain", "bus", "slot", "function"))
        hits = [d.target for d in disks if d.pci == pci]
        if len(hits) == 1:
            return hits[0]
    return None


def map_fsinfo(fsinfo: list[dict[str, Any]], domain_xml: str) -> list[GuestFilesystem]:
    """Join guest-get-fsinfo's answer with the domain XML (pure; unit-testable)."""
    disks = _xml_disks(domain_xml)
    out: list[GuestFilesystem] = []
    for fs in fsinfo:
        targets: list[str] = []
        mapped = bool(fs.get("disk"))
        for agent_disk in fs.get("disk") or []:
            target = _match(agent_disk, disks)
            if target is None:
                mapped = False
            elif target not in targets:
                targets.append(target)
        out.append(
            GuestFilesystem(
                str(fs.get("mountpoint", "")),
                str(fs.get("type", "")),
                str(fs.get("name", "")),
                tuple(targets),
                mapped,
            )
        )
    return out


def guest_fsinfo(dom: libvirt.virDomain, *, timeout: float = 5.0) -> list[GuestFilesystem]:
    """The guest's mounted filesystems mapped to domain disk targets (guest-get-fsinfo)."""
    start = time.monotonic()
    info = agent_command(dom, "guest-get-fsinfo", timeout=timeout)
    if not isinstance(info, list):
        raise AgentCommandFailed(f"guest-get-fsinfo: unexpected answer {info!r}")
    remaining = max(0.5, timeout - (time.monotonic() - start))
    xml = call_with_deadline(lambda: dom.XMLDesc(0), remaining, "XMLDesc")
    return map_fsinfo(info, xml)


def fs_freeze(dom: libvirt.virDomain, mountpoints: list[str] | None, *, timeout: float) -> int:
    """Freeze ``mountpoints`` (all when None) through libvirt; number frozen. Bounded."""
    return int(call_with_deadline(lambda: dom.fsFreeze(mountpoints, 0), timeout, "fsfreeze"))


def fs_thaw(dom: libvirt.virDomain, *, timeout: float) -> int:
    """Thaw every frozen filesystem (qemu-ga has no thaw-list); number thawed. Bounded."""
    return int(call_with_deadline(lambda: dom.fsThaw(None, 0), timeout, "fsthaw"))
