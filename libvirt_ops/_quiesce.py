"""Quiesce policy and a freeze of only the filesystems that live on the snapshotted disks.

Why not libvirt's QUIESCE flag: it freezes every filesystem of the guest, for the whole
snapshot call, and thaws only if libvirtd survives. Here the freeze list is the filesystems
on the disks being snapshotted (guest-get-fsinfo joined with the domain XML), a watchdog
process is armed before the freeze and thaws at the deadline even if we die, and the
freeze window holds nothing but the snapshot transaction. libvirt's flag stays as the
fallback when a filesystem cannot be mapped to disks.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt

from libvirt_ops._agent import GuestFilesystem, fs_freeze, fs_thaw
from libvirt_ops._thaw_watchdog import ThawWatchdog
from libvirt_ops.errors import LibvirtOpsError, Timeout

LOG = logging.getLogger(__name__)

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
    """Times (monotonic seconds) and outcome of one freeze, filled in by :class:`Frozen`."""

    frozen: int = 0
    deadline: float = 0.0
    t_freeze_start: float = 0.0
    t_frozen: float = 0.0
    t_thawed: float = 0.0
    thaw_by: str = ""  # "us", "watchdog", or "" while still frozen

    def held(self, t_end: float) -> bool:
        """True if ``t_end`` lies before the deadline: the watchdog had not thawed yet."""
        return self.frozen > 0 and t_end < self.deadline


class Frozen:
    """Context manager: watchdog armed, mountpoints frozen; thawed on exit, always.

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
