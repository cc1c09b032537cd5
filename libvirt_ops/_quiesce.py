"""Quiesce policy and a freeze of only the filesystems that live on the snapshotted disks.

Why not libvirt's QUIESCE flag: it freezes every filesystem of the guest, for the whole
snapshot call, and thaws only if libvirtd survives. Here the freeze list is the filesystems
on the disks being snapshotted (guest-get-fsinfo joined with the domain XML), a watchdog
process is armed before the freeze and thaws at the deadline even if we die, and the
freeze window holds only libvirt's snapshot call (overlays exist already). libvirt's flag
stays as the fallback when a filesystem cannot be mapped to disks.

Where a 4-disk window goes (libvirtd debug log, TCG guest, loaded host, medians ms):
qemu-ga freezing 4 ext4 one after another ~200, libvirt's snapshot call ~105 (XML parse,
query-named-block-nodes, blockdev-add file+format per overlay, the QMP transaction, the
status XML written with fsync), thaw ~40, our own hand-offs < 1. virsh's own --quiesce
spends the same on freeze and thaw and ~200 creating overlays inside its window.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from libvirt_ops._agent import GuestFilesystem, agent_error, fs_freeze, fs_thaw
from libvirt_ops._thaw_watchdog import ThawWatchdog
from libvirt_ops.errors import LibvirtOpsError, Timeout

LOG = logging.getLogger(__name__)
T = TypeVar("T")

#: Watchdogs left armed after a freeze that timed out; they exit on their own.
_DETACHED: list[ThawWatchdog] = []


class QuiescePolicy(enum.StrEnum):
    """``require``: fail unless quiesced; ``prefer``: fall back to crash-consistent; ``off``."""

    REQUIRE = "require"
    PREFER = "prefer"
    OFF = "off"


class FreezeMethod(enum.StrEnum):
    """How a snapshot was (or was not) quiesced."""

    FREEZE_LIST = "freeze-list"  # our own freeze of the mapped mountpoints
    LIBVIRT = "libvirt"  # libvirt's QUIESCE flag: all filesystems
    NONE = "none"  # crash-consistent


@dataclass(frozen=True)
class FreezePlan:
    """``method`` FREEZE_LIST with ``mountpoints`` (possibly empty: nothing mounted on the
    snapshotted disks), or LIBVIRT when some filesystem could not be mapped to its disks."""

    method: FreezeMethod
    mountpoints: tuple[str, ...]
    reason: str = ""


def plan_freeze(filesystems: Iterable[GuestFilesystem], targets: Iterable[str]) -> FreezePlan:
    """Mountpoints to freeze for a snapshot of disk ``targets`` (pure, unit-tested).

    A filesystem is frozen if any of its disks is snapshotted (one spanning several disks
    must be frozen whole). An unmapped filesystem might be on a snapshotted disk, so it
    forces libvirt's freeze-everything fallback rather than a guess.
    """
    want = set(targets)
    mounts: list[str] = []
    for fs in filesystems:
        if not fs.mapped:
            return FreezePlan(
                FreezeMethod.LIBVIRT, (), f"filesystem {fs.mountpoint} not mapped to a domain disk"
            )
        if want.intersection(fs.targets) and fs.mountpoint not in mounts:
            mounts.append(fs.mountpoint)
    return FreezePlan(FreezeMethod.FREEZE_LIST, tuple(mounts))


@dataclass
class FreezeWindow:
    """Times (monotonic seconds) and outcome of one freeze, filled in by :func:`frozen_call`
    (or :class:`Frozen`). A writer on the first-frozen filesystem stalls from inside the
    freeze call to inside the thaw call, so every phase between counts."""

    frozen: int = 0
    deadline: float = 0.0
    t_freeze_start: float = 0.0
    t_frozen: float = 0.0
    t_action_start: float = 0.0
    t_action_end: float = 0.0
    t_thaw_start: float = 0.0
    t_thawed: float = 0.0
    thaw_by: str = ""  # "us", "watchdog", or "" while still frozen

    def held(self, t_end: float) -> bool:
        """True if ``t_end`` lies before the deadline: the watchdog had not thawed yet."""
        return self.frozen > 0 and t_end < self.deadline

    def breakdown_ms(self) -> dict[str, float]:
        """Milliseconds per phase: where the guest's stall goes (logged, printed by bench/)."""

        def ms(a: float, b: float) -> float:
            return round((b - a) * 1000.0, 1) if a and b else 0.0

        return {
            "freeze": ms(self.t_freeze_start, self.t_frozen),
            "to_action": ms(self.t_frozen, self.t_action_start),
            "action": ms(self.t_action_start, self.t_action_end),
            "to_thaw": ms(self.t_action_end, self.t_thaw_start),
            "thaw": ms(self.t_thaw_start, self.t_thawed),
            "window": ms(self.t_freeze_start, self.t_thawed),
        }


def frozen_call(
    dom: libvirt.virDomain,
    uri: str,
    mountpoints: tuple[str, ...],
    action: Callable[[], T],
    *,
    freeze_timeout: float,
    max_frozen: float,
) -> tuple[T, FreezeWindow]:
    """Freeze ``mountpoints``, run ``action``, thaw: back to back on ONE worker thread.

    Why one thread: no thread hand-off or thread start sits inside the window (our own share
    of it is now < 0.2 ms; the rest is qemu-ga and libvirt, see ``breakdown_ms``). The
    caller only waits, with deadlines: the freeze is bounded by
    ``freeze_timeout`` (a freeze that lands after that is thawed at once, the action never
    runs, :class:`Timeout` is raised); the thaw by the watchdog, armed before the freeze,
    which thaws at ``max_frozen`` even if this process dies. The action itself (the
    snapshot call) is not abandoned half-way: it runs to its end, then the thaw follows.
    Raises what the freeze raised (AgentUnavailable, AgentCommandFailed, Timeout), else
    what the action raised, after the thaw.
    """
    dog = ThawWatchdog(uri, dom.UUIDString())
    w = FreezeWindow()
    w.deadline = dog.arm(max_frozen)
    lock = threading.Lock()
    phase = ["freezing"]
    out: dict[str, Any] = {}
    froze, acted, thawed = threading.Event(), threading.Event(), threading.Event()

    def worker() -> None:
        w.t_freeze_start = time.monotonic()
        try:
            n = dom.fsFreeze(list(mountpoints), 0)
        except BaseException as exc:
            out["freeze_error"] = exc
            froze.set()
            return
        w.t_frozen = time.monotonic()
        with lock:  # decided together with the caller's give-up, never in between
            late = phase[0] == "abandoned"
            w.frozen = int(n)
            froze.set()
        if late:  # the caller gave up on this freeze: no action, thaw at once
            with contextlib.suppress(libvirt.libvirtError):
                dom.fsThaw(None, 0)
            return
        w.t_action_start = time.monotonic()
        try:
            out["value"] = action()
        except BaseException as exc:
            out["error"] = exc
        w.t_action_end = w.t_thaw_start = time.monotonic()
        acted.set()
        try:
            dom.fsThaw(None, 0)
        except BaseException as exc:
            out["thaw_error"] = exc
        w.t_thawed = time.monotonic()
        thawed.set()

    threading.Thread(target=worker, name="freeze-window", daemon=True).start()
    try:
        if not froze.wait(freeze_timeout):
            with lock:
                gave_up = not froze.is_set()
                if gave_up:
                    phase[0] = "abandoned"
            if gave_up:
                # It may still land: the worker then thaws; the watchdog stays armed (its
                # pipe kept open, EOF would thaw at once) and thaws again at the deadline.
                _DETACHED.append(dog)
                w.thaw_by = "watchdog"
                w.t_thawed = time.monotonic()
                raise Timeout(f"fsfreeze: no answer within {freeze_timeout:.1f} s")
        if "freeze_error" in out:
            dog.thaw_now()
            w.thaw_by = "watchdog"
            w.t_thawed = time.monotonic()
            err = out["freeze_error"]
            if isinstance(err, libvirt.libvirtError):
                raise agent_error(err, "fsfreeze") from err
            raise err
        # The action is never abandoned (see above); the thaw after it is bounded.
        acted.wait()
        if not thawed.wait(max(1.0, w.deadline - time.monotonic() + 1.0)) or "thaw_error" in out:
            why = out.get("thaw_error", "no answer")
            LOG.warning("our thaw failed (%s); the watchdog thaws: %s", why, dog.thaw_now())
            w.thaw_by = "watchdog"
            w.t_thawed = w.t_thawed or time.monotonic()
        else:
            w.thaw_by = "us"
            dog.done()
    except BaseException:
        if not w.thaw_by:
            dog.thaw_now()
            w.thaw_by = "watchdog"
        raise
    LOG.debug("freeze window of %s %s (ms): %s", dom.name(), mountpoints, w.breakdown_ms())
    if "error" in out:
        raise out["error"]
    value: T = out["value"]
    return value, w


class Frozen:
    """Context manager: watchdog armed, mountpoints frozen; thawed on exit, always.

    For holding a freeze open across caller code (tests, tools); a snapshot uses
    :func:`frozen_call`, which keeps the whole window on one thread.

    Entering raises what the freeze raised (AgentUnavailable, AgentCommandFailed,
    Timeout); the watchdog is then told to thaw in case a late freeze still lands.
    """

    def __init__(
        self,
        dom: libvirt.virDomain,
        uri: str,
        mountpoints: tuple[str, ...],
        *,
        freeze_timeout: float,
        max_frozen: float,
    ) -> None:
        self.dom = dom
        self.uri = uri
        self.mountpoints = mountpoints
        self.freeze_timeout = freeze_timeout
        self.max_frozen = max_frozen
        self.window = FreezeWindow()
        self._dog: ThawWatchdog | None = None

    def __enter__(self) -> FreezeWindow:
        dog = ThawWatchdog(self.uri, self.dom.UUIDString())
        self._dog = dog
        w = self.window
        w.deadline = dog.arm(self.max_frozen)
        w.t_freeze_start = time.monotonic()
        try:
            w.frozen = fs_freeze(self.dom, list(self.mountpoints), timeout=self.freeze_timeout)
        except Timeout:
            # The freeze may still land after we stopped waiting: thaw now, and leave the
            # watchdog armed so it thaws again at the deadline.
            with contextlib.suppress(LibvirtOpsError):
                fs_thaw(self.dom, timeout=self.freeze_timeout)
            _DETACHED.append(dog)  # keep its pipe open (EOF would thaw at once, too early)
            w.thaw_by = "watchdog"
            w.t_thawed = time.monotonic()
            raise
        except BaseException:
            dog.thaw_now()
            w.thaw_by = "watchdog"
            w.t_thawed = time.monotonic()
            raise
        w.t_frozen = time.monotonic()
        return w

    def __exit__(self, *exc: object) -> None:
        dog = self._dog
        assert dog is not None
        w = self.window
        try:
            fs_thaw(self.dom, timeout=max(1.0, w.deadline - time.monotonic() + 1.0))
        except LibvirtOpsError as err:
            LOG.warning("our thaw failed (%s); the watchdog thaws: %s", err, dog.thaw_now())
            w.thaw_by = "watchdog"
        else:
            w.thaw_by = "us"
            dog.done()
        w.t_thawed = time.monotonic()
