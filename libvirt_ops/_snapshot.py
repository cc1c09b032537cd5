"""External snapshot of one, some or all disks of a running domain, in ONE atomic call.

Why this shape (Nova's ``_volume_snapshot_create`` is the counter-example): the overlays are
created and inspected by qcow2/ BEFORE anything is frozen (REUSE_EXT), so the freeze window
holds only the QMP transaction; only the snapshotted disks' filesystems are frozen; every
other disk is listed ``snapshot='no'``; afterwards the live XML is read back and each disk's
top must be its new overlay. Failures leave no overlay behind and never delete a file the
domain uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import libvirt
from lxml import etree

from libvirt_ops._agent import AgentCommandFailed, agent_connected, guest_fsinfo
from libvirt_ops._connection import Connection
from libvirt_ops._domain import ChainLayer, Disk, domain_disks
from libvirt_ops._quiesce import (
    FreezeMethod,
    FreezePlan,
    FreezeWindow,
    QuiescePolicy,
    frozen_call,
    plan_freeze,
)
from libvirt_ops.errors import (
    AgentUnavailable,
    DiskNotFound,
    DomainNotFound,
    QuiesceFailed,
    SnapshotFailed,
    Timeout,
)
from qcow2 import Qcow2Error, create_overlay, inspect_chain
from qcow2.naming import CINDER, Naming, is_uuid, volume_base_name

LOG = logging.getLogger(__name__)

BASE_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)
_AGENT_ERRORS = (AgentUnavailable, AgentCommandFailed, Timeout)


@dataclass(frozen=True)
class DiskSnapshotSpec:
    """One disk to snapshot, named by volume id (``<serial>``) or by a file of its chain."""

    new_file: str
    volume_id: str | None = None
    path: str | None = None
    #: The overlay was pre-created by the caller (Cinder does this): inspect it, never
    #: create or delete it.
    reuse_existing: bool = False

    def __post_init__(self) -> None:
        if (self.volume_id is None) == (self.path is None):
            raise ValueError("give exactly one of volume_id or path")


@dataclass(frozen=True)
class Deadlines:
    """Seconds. ``agent``: fsinfo and freeze calls; ``max_frozen``: the watchdog's thaw."""

    agent: float = 5.0
    max_frozen: float = 10.0


@dataclass(frozen=True)
class SnapshotRequest:
    domain: str  # name or UUID
    disks: tuple[DiskSnapshotSpec, ...]
    quiesce: QuiescePolicy = QuiescePolicy.PREFER
    deadlines: Deadlines = Deadlines()
    naming: Naming = CINDER


@dataclass(frozen=True)
class DiskSnapshotResult:
    target: str
    volume_id: str | None
    new_file: str  # absolute path of the new active overlay
    chain: tuple[ChainLayer, ...]  # live chain after the snapshot, top first


@dataclass(frozen=True)
class SnapshotTimings:
    """Seconds: overlays+validation, the freeze call, time frozen, the snapshot call, total.

    Inside the freeze window (freeze-list method): ``freeze`` (qemu-ga freezing, last
    filesystem first), ``to_call`` (freeze answer -> snapshot call), ``snapshot_call``
    (libvirt: blockdev-add of the overlays + the QMP transaction), ``to_thaw`` and ``thaw``.
    ``frozen`` spans them all.
    """

    prepare: float = 0.0
    freeze: float = 0.0
    frozen: float = 0.0
    snapshot_call: float = 0.0
    total: float = 0.0
    to_call: float = 0.0
    to_thaw: float = 0.0
    thaw: float = 0.0


@dataclass(frozen=True)
class SnapshotResult:
    quiesced: bool
    method: FreezeMethod
    frozen_mountpoints: tuple[str, ...]
    disks: tuple[DiskSnapshotResult, ...]
    timings: SnapshotTimings
    fallback_reason: str | None = None
    warnings: tuple[str, ...] = field(default=())


# --- validation and overlays -----------------------------------------------------------


def _resolve(disks: list[Disk], spec: DiskSnapshotSpec) -> Disk:
    for disk in disks:
        if spec.volume_id is not None and disk.serial == spec.volume_id:
            return disk
        if spec.path is not None:
            want = os.path.realpath(spec.path)
            if any(os.path.realpath(layer.path) == want for layer in disk.chain):
                return disk
    raise DiskNotFound(f"no disk for {spec.volume_id or spec.path}")


def validate_new_file(
    disk: Disk, new_file: str, naming: Naming, *, must_exist: bool = False
) -> str:
    """The absolute overlay path for ``new_file``, or SnapshotFailed. Touches nothing.

    ``new_file`` arrives over the API: it must be a plain basename matching the naming
    convention, belong to this disk's volume, not be in the chain, and not exist.
    """
    if os.path.basename(new_file) != new_file or new_file in ("", ".", ".."):
        raise SnapshotFailed(f"new_file {new_file!r} is not a plain basename")
    if not naming.is_image_name(new_file):
        raise SnapshotFailed(f"new_file {new_file!r} does not match the naming convention")
    if disk.serial and is_uuid(disk.serial) and naming is CINDER:
        prefix = volume_base_name(disk.serial) + "."
        if not new_file.startswith(prefix):
            raise SnapshotFailed(f"new_file {new_file!r} is not a file of volume {disk.serial}")
    if disk.fmt not in ("qcow2", "raw"):
        raise SnapshotFailed(f"disk {disk.target} has format {disk.fmt}")
    path = os.path.join(os.path.dirname(disk.source), new_file)
    if any(os.path.basename(layer.path) == new_file for layer in disk.chain):
        raise SnapshotFailed(f"new_file {new_file!r} is already in the chain of {disk.target}")
    if must_exist:
        if not os.path.isfile(path) or os.path.islink(path):
            raise SnapshotFailed(f"{path} is not an existing regular file")
    elif os.path.lexists(path):
        raise SnapshotFailed(f"{path} already exists")
    return path


def check_existing_overlay(new_path: str, disk: Disk, roots: Sequence[str], naming: Naming) -> None:
    """A caller-made overlay must back onto exactly the disk's current top (relative name).

    Whole chain inspected by qcow2/ first, so a hostile pre-created file is refused before
    QEMU opens it.
    """
    try:
        with inspect_chain(new_path, roots=roots, naming=naming, fmt="qcow2") as chain:
            top = chain.layers[0]
    except Qcow2Error as exc:
        raise SnapshotFailed(f"pre-created overlay {new_path} refused: {exc}") from exc
    want = os.path.basename(disk.source)
    if top.backing_name != want or top.backing_fmt != disk.fmt:
        raise SnapshotFailed(
            f"pre-created overlay {new_path} backs onto {top.backing_name!r} "
            f"({top.backing_fmt}), not the disk's top {want!r} ({disk.fmt})"
        )


def _create_overlay(new_path: str, disk: Disk, roots: Sequence[str], naming: Naming) -> None:
    """Pre-create the overlay through qcow2/: whole chain inspected, relative backing name."""
    try:
        create_overlay(new_path, disk.source, backing_fmt=disk.fmt, roots=roots, naming=naming)
    except Qcow2Error as exc:
        raise SnapshotFailed(f"cannot create overlay {new_path}: {exc}") from exc


def _remove_unused(paths: Sequence[str], dom: libvirt.virDomain) -> None:
    """Delete our overlays, except any the domain's live XML shows in use."""
    try:
        in_use = {os.path.realpath(layer.path) for d in domain_disks(dom) for layer in d.chain}
    except libvirt.libvirtError:
        LOG.error("cannot read the live XML; leaving overlays %s in place", paths)
        return
    for path in paths:
        if os.path.realpath(path) in in_use:
            LOG.error("overlay %s is in use by the domain; not removing it", path)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- the snapshot XML ------------------------------------------------------------------


def snapshot_xml(all_targets: Sequence[str], overlays: dict[str, str]) -> str:
    """``<domainsnapshot>`` with external ``overlays`` (target -> path), others ``no``."""
    root = etree.Element("domainsnapshot")
    disks_el = etree.SubElement(root, "disks")
    for target in all_targets:
        el = etree.SubElement(disks_el, "disk", name=target)
        if target in overlays:
            el.set("snapshot", "external")
            el.set("type", "file")
            etree.SubElement(el, "driver", type="qcow2")
            etree.SubElement(el, "source", file=overlays[target])
        else:
            el.set("snapshot", "no")
    return etree.tostring(root, encoding="unicode")


def _all_targets(dom: libvirt.virDomain) -> list[str]:
    """Every ``<disk>`` target, file-backed or not: each must be named in the snapshot XML."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    return [t.get("dev", "") for t in root.findall("./devices/disk/target") if t.get("dev")]


# --- the operation ---------------------------------------------------------------------


def _plan(dom: libvirt.virDomain, request: SnapshotRequest, targets: list[str]) -> FreezePlan:
    """Where quiescing is impossible: QuiesceFailed under require, a NONE plan under prefer."""
    if request.quiesce is QuiescePolicy.OFF:
        return FreezePlan(FreezeMethod.NONE, (), "policy off")
    try:
        if not agent_connected(dom):
            raise AgentUnavailable("guest agent is not connected")
        return plan_freeze(guest_fsinfo(dom, timeout=request.deadlines.agent), targets)
    except _AGENT_ERRORS as exc:
        if request.quiesce is QuiescePolicy.REQUIRE:
            raise QuiesceFailed(f"cannot quiesce {dom.name()}: {exc}") from exc
        return FreezePlan(FreezeMethod.NONE, (), str(exc))


def _call(dom: libvirt.virDomain, xml: str, flags: int) -> float:
    t0 = time.monotonic()
    try:
        dom.snapshotCreateXML(xml, flags)
    except libvirt.libvirtError as exc:
        raise SnapshotFailed(f"snapshotCreateXML on {dom.name()}: {exc}") from exc
    return time.monotonic() - t0


_DOMAIN_LOCKS: dict[str, threading.Lock] = {}
_DOMAIN_LOCKS_GUARD = threading.Lock()


def _domain_lock(domain: str) -> threading.Lock:
    with _DOMAIN_LOCKS_GUARD:
        return _DOMAIN_LOCKS.setdefault(domain.lower(), threading.Lock())


def take_snapshot(
    conn: Connection, request: SnapshotRequest, *, roots: Sequence[str]
) -> SnapshotResult:
    """Snapshot the requested disks of a running domain atomically, quiesced per policy.

    One snapshot per domain at a time in this process: the guest agent has one freeze state,
    so a second snapshot of the same guest started inside the first one's freeze could only
    fall back to crash-consistent (measured: 15 of 50 concurrent creates did before this).
    """
    with _domain_lock(request.domain):
        return _take_snapshot(conn, request, roots=roots)


def _take_snapshot(
    conn: Connection, request: SnapshotRequest, *, roots: Sequence[str]
) -> SnapshotResult:
    t_start = time.monotonic()
    try:
        dom = conn.lookup(request.domain)
    except libvirt.libvirtError as exc:
        raise DomainNotFound(f"no domain {request.domain}: {exc}") from exc
    if not dom.isActive():
        raise DomainNotFound(f"domain {request.domain} is not running")
    if not request.disks:
        raise SnapshotFailed("no disks requested")
    disks = domain_disks(dom)
    chosen: dict[str, tuple[Disk, str]] = {}
    reused: set[str] = set()
    for spec in request.disks:
        disk = _resolve(disks, spec)
        if disk.target in chosen:
            raise SnapshotFailed(f"disk {disk.target} requested twice")
        if not disk.snapshot_capable:
            raise SnapshotFailed(f"disk {disk.target} is read-only or shareable")
        path = validate_new_file(
            disk, spec.new_file, request.naming, must_exist=spec.reuse_existing
        )
        if spec.reuse_existing:
            check_existing_overlay(path, disk, roots, request.naming)
            reused.add(disk.target)
        chosen[disk.target] = (disk, path)
    new_paths = {target: path for target, (_d, path) in chosen.items()}
    if len(set(new_paths.values())) != len(new_paths):
        raise SnapshotFailed("two disks would share one overlay file")

    created: list[str] = []
    try:
        for target, (disk, path) in chosen.items():
            if target in reused:
                continue  # the caller's file: never created nor removed here
            _create_overlay(path, disk, roots, request.naming)
            created.append(path)
        xml = snapshot_xml(_all_targets(dom), new_paths)
        plan = _plan(dom, request, list(chosen))
        t_prepared = time.monotonic()
        result = _snapshot_with_plan(conn, dom, request, plan, xml)
    except BaseException:
        _remove_unused(created, dom)
        raise
    quiesced, method, mounts, fallback, window, call_s, warns = result

    after = {d.target: d for d in domain_disks(dom)}
    out: list[DiskSnapshotResult] = []
    for target, (disk, path) in chosen.items():
        live = after.get(target)
        ok = (
            live is not None
            and len(live.chain) >= 2
            and os.path.realpath(live.source) == os.path.realpath(path)
            and os.path.realpath(live.chain[1].path) == os.path.realpath(disk.source)
        )
        if not ok:
            _remove_unused(created, dom)
            raise SnapshotFailed(
                f"after the snapshot {target}'s top is {live.source if live else None}, not {path}"
            )
        out.append(DiskSnapshotResult(target, disk.serial, path, live.chain if live else ()))
    # Another operation on another disk of this domain (a snapshot or a pivot) may change that
    # disk's top meanwhile: legitimate, and our snapshot is already taken. Only our own new file
    # showing up on a disk we did not ask for is a fault.
    ours = {os.path.realpath(p) for _, p in chosen.values()}
    for disk in disks:
        live = after.get(disk.target)
        if disk.target not in chosen and live is not None and live.source != disk.source:
            if os.path.realpath(live.source) in ours:
                raise SnapshotFailed(f"disk {disk.target} got {live.source} although not requested")
            LOG.info("disk %s changed meanwhile (%s): another operation", disk.target, live.source)
    t_end = time.monotonic()
    return SnapshotResult(
        quiesced=quiesced,
        method=method,
        frozen_mountpoints=mounts,
        disks=tuple(out),
        timings=_timings(t_prepared - t_start, t_end - t_start, window, call_s),
        fallback_reason=fallback,
        warnings=tuple(warns),
    )


_Outcome = tuple[
    bool, FreezeMethod, tuple[str, ...], str | None, FreezeWindow | None, float, list[str]
]


def _timings(
    prepare: float, total: float, w: FreezeWindow | None, call_s: float
) -> SnapshotTimings:
    if w is None:  # no freeze of ours (libvirt's flag: the call is the whole window)
        return SnapshotTimings(prepare=prepare, snapshot_call=call_s, total=total)
    return SnapshotTimings(
        prepare=prepare,
        freeze=w.t_frozen - w.t_freeze_start,
        frozen=w.t_thawed - w.t_freeze_start,
        snapshot_call=call_s,
        total=total,
        to_call=w.t_action_start - w.t_frozen,
        to_thaw=w.t_thaw_start - w.t_action_end,
        thaw=w.t_thawed - w.t_thaw_start,
    )


def _snapshot_with_plan(
    conn: Connection, dom: libvirt.virDomain, request: SnapshotRequest, plan: FreezePlan, xml: str
) -> _Outcome:
    """Run the one snapshotCreateXML call inside the planned freeze (or libvirt's)."""
    policy = request.quiesce
    if plan.method is FreezeMethod.NONE:
        call_s = _call(dom, xml, BASE_FLAGS)
        reason = plan.reason if policy is not QuiescePolicy.OFF else None
        return False, FreezeMethod.NONE, (), reason, None, call_s, []

    if plan.method is FreezeMethod.LIBVIRT:
        try:
            call_s = _call(dom, xml, BASE_FLAGS | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE)
            return True, FreezeMethod.LIBVIRT, (), plan.reason, None, call_s, []
        except SnapshotFailed as exc:
            if policy is QuiescePolicy.REQUIRE:
                raise QuiesceFailed(f"libvirt quiesced snapshot failed: {exc}") from exc
            call_s = _call(dom, xml, BASE_FLAGS)  # Nova's retry, but only under prefer
            return False, FreezeMethod.NONE, (), f"{plan.reason}; {exc}", None, call_s, []

    if not plan.mountpoints:  # nothing mounted on these disks: nothing to flush
        call_s = _call(dom, xml, BASE_FLAGS)
        return True, FreezeMethod.FREEZE_LIST, (), None, None, call_s, []

    try:
        # ``_call`` is looked up when the worker runs it (tests stretch the window there).
        call_s, w = frozen_call(
            dom,
            conn.uri,
            plan.mountpoints,
            lambda: _call(dom, xml, BASE_FLAGS),
            freeze_timeout=request.deadlines.agent,
            max_frozen=request.deadlines.max_frozen,
        )
    except _AGENT_ERRORS as exc:  # raised by the freeze: the snapshot was not taken
        if policy is QuiescePolicy.REQUIRE:
            raise QuiesceFailed(f"freezing {plan.mountpoints} failed: {exc}") from exc
        call_s = _call(dom, xml, BASE_FLAGS)
        return False, FreezeMethod.NONE, (), str(exc), None, call_s, []
    warns: list[str] = []
    held = w.held(w.t_action_end)
    if not held:
        warns.append("the freeze deadline passed before the snapshot returned")
    if w.frozen < len(plan.mountpoints):
        warns.append(f"froze {w.frozen} of {len(plan.mountpoints)} filesystems")
    if w.thaw_by != "us":
        warns.append(f"thawed by {w.thaw_by or 'nobody'}")
    return held, FreezeMethod.FREEZE_LIST, plan.mountpoints, None, w, call_s, warns
