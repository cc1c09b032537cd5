"""Run one libvirt block job on one disk and await its end by events, with a deadline.

Why not poll like Nova: ``blockJobInfo`` polling every 0.5 s with no deadline misses nothing
only by luck, and Nova takes a job that vanished as a success. Here the end of a job is the
BLOCK_JOB_2 event; ``blockJobInfo`` is read only to feed a progress callback, to refuse a
busy disk, and after a libvirtd restart (events sent while we were disconnected are lost, so
the job is re-checked and, if it is gone, the caller decides by the real chain).

One job per disk: an in-process lock per (uri, domain, disk) plus ``blockJobInfo`` (jobs
started by anybody else) give :class:`DiskBusy` at once instead of a confusing libvirt error.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import libvirt

from libvirt_ops._connection import Connection
from libvirt_ops.errors import BlockJobFailed, DiskBusy, LibvirtUnavailable, Timeout

LOG = logging.getLogger(__name__)

#: ``(cur, end)`` as libvirt reports them (bytes of work done / total work).
Progress = Callable[[int, int], None]

#: How long to wait for a late event once ``blockJobInfo`` says the job is gone.
_LATE_EVENT_GRACE = 1.0
#: While libvirtd is unreachable, how often to try the re-check (the connection, not the job).
_RECHECK_RETRY = 1.0


def _msg(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


class JobType(enum.IntEnum):
    """libvirt's ``VIR_DOMAIN_BLOCK_JOB_TYPE_*``."""

    PULL = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    COPY = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
    COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT
    ACTIVE_COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT


class JobEnd(enum.Enum):
    """How a wait ended. VANISHED: the job is gone and its event was lost (libvirtd restart)."""

    COMPLETED = libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED
    FAILED = libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED
    CANCELED = libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED
    READY = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
    VANISHED = -1


_TERMINAL = frozenset({JobEnd.COMPLETED, JobEnd.FAILED, JobEnd.CANCELED, JobEnd.VANISHED})


class CancelToken:
    """Lets another thread cancel a running job; the waiter wakes at once and aborts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._hooks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def _add_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.append(hook)
        if self._cancelled:
            hook()

    def _remove_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)


@dataclass(frozen=True)
class JobOptions:
    """How to run a job: deadline, bandwidth (bytes/s, 0 = unlimited), progress, cancel.

    ``started``: called once right after libvirt accepted the job (the agent's test-only
    crash injection dies there, leaving the job running as a kill -9 would).
    """

    timeout: float = 3600.0
    bandwidth: int = 0
    progress: Progress | None = None
    progress_interval: float = 0.5
    cancel: CancelToken | None = None
    started: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.bandwidth < 0 or self.progress_interval <= 0:
            raise ValueError(f"invalid job options {self}")


# -- per-disk locks and event dispatch ---------------------------------------------------

_disk_locks_guard = threading.Lock()
_disk_locks: dict[tuple[str, str, str], threading.Lock] = {}


def _disk_lock(uri: str, dom_uuid: str, target: str) -> threading.Lock:
    with _disk_locks_guard:
        return _disk_locks.setdefault((uri, dom_uuid, target), threading.Lock())


class _Tracker:
    """One BLOCK_JOB_2 subscription and one reconnect listener per Connection, fanned out."""

    def __init__(self, conn: Connection) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], BlockJob] = {}
        conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_event)
        conn.on_reconnect(self._on_reconnect)

    def add(self, job: BlockJob) -> None:
        with self._lock:
            self._jobs[(job.dom_uuid, job.target)] = job

    def remove(self, job: BlockJob) -> None:
        with self._lock:
            if self._jobs.get((job.dom_uuid, job.target)) is job:
                del self._jobs[(job.dom_uuid, job.target)]

    def _on_event(
        self, _conn: Any, dom: Any, disk: str, job_type: int, status: int, _opaque: Any
    ) -> None:
        try:
            key = (dom.UUIDString(), disk)
        except libvirt.libvirtError:
            return
        with self._lock:
            job = self._jobs.get(key)
        if job is not None:
            job._deliver(job_type, status)

    def _on_reconnect(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job._request_recheck()


_trackers_guard = threading.Lock()
_trackers: weakref.WeakKeyDictionary[Connection, _Tracker] = weakref.WeakKeyDictionary()


def _tracker(conn: Connection) -> _Tracker:
    with _trackers_guard:
        tracker = _trackers.get(conn)
        if tracker is None:
            tracker = _trackers[conn] = _Tracker(conn)
        return tracker


# -- one job -----------------------------------------------------------------------------


class BlockJob:
    """Claim a disk, start one job on it, await its events; a context manager.

    ``with BlockJob(conn, dom, "vda", JobType.COMMIT, opts) as job: job.start(fn);
    job.wait({JobEnd.COMPLETED})``. Entering raises :class:`DiskBusy` when the disk has a
    job; leaving releases the claim (a still-running job is aborted first).
    ``adopt=True`` instead takes over the job already on the disk (one a dead process
    left, see :func:`libvirt_ops.settle_block_job`): no start, :meth:`wait` re-checks it first.
    """

    def __init__(
        self,
        conn: Connection,
        dom: libvirt.virDomain,
        target: str,
        job_type: JobType,
        options: JobOptions | None = None,
        *,
        adopt: bool = False,
    ) -> None:
        self.adopt = adopt
        self.conn = conn
        self.dom_uuid = dom.UUIDString()
        self.dom_name = dom.name()
        self.target = target
        self.job_type = job_type
        self.options = options or JobOptions()
        self.last_cur: int | None = None
        self.last_end: int | None = None
        self.event_lost = False
        self._cond = threading.Condition()
        self._events: deque[JobEnd] = deque()
        self._recheck = False
        self._started = False
        self._finished = False
        self._lock = _disk_lock(conn.uri, self.dom_uuid, target)
        self._claimed = False

    def __repr__(self) -> str:
        return f"<BlockJob {self.job_type.name} {self.dom_name}:{self.target}>"

    # -- claim / release ---------------------------------------------------------------
    def __enter__(self) -> BlockJob:
        if not self._lock.acquire(blocking=False):
            raise DiskBusy(f"{self.dom_name}:{self.target} has a block job of this process")
        self._claimed = True
        try:
            info = self.info()
            if info and not self.adopt:
                raise DiskBusy(f"{self.dom_name}:{self.target} already has a block job: {info}")
            _tracker(self.conn).add(self)
            if self.adopt:  # its events may be long gone: the first wait() re-checks
                self._started = True
                self._request_recheck()
        except BaseException:
            self._release()
            raise
        if self.options.cancel is not None:
            self.options.cancel._add_hook(self._request_recheck)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.options.cancel is not None:
            self.options.cancel._remove_hook(self._request_recheck)
        try:
            if self._started and not self._finished:
                self._abort_quietly()
        finally:
            _tracker(self.conn).remove(self)
            self._release()

    def _release(self) -> None:
        if self._claimed:
            self._claimed = False
            self._lock.release()

    # -- libvirt calls -----------------------------------------------------------------
    def domain(self) -> libvirt.virDomain:
        """The domain through the live connection (a handle from before a restart is dead)."""
        return self.conn.get().lookupByUUIDString(self.dom_uuid)

    def info(self) -> dict[str, int]:
        """``blockJobInfo`` of the disk: empty when it has no job."""
        info = self.domain().blockJobInfo(self.target, 0)
        return dict(info) if info else {}

    def start(self, call: Callable[[libvirt.virDomain], object]) -> None:
        """Start the job with ``call(dom)``; a refusal by libvirt/QEMU is BlockJobFailed."""
        if not self._claimed or self._started:
            raise RuntimeError("start() needs a fresh, entered BlockJob")
        with self._cond:
            self._events.clear()  # anything before our start is not about our job
        try:
            call(self.domain())
        except libvirt.libvirtError as exc:
            raise BlockJobFailed(
                f"{self.job_type.name} on {self.dom_name}:{self.target} refused: {_msg(exc)}"
            ) from exc
        self._started = True
        if self.options.started is not None:
            self.options.started()

    def pivot(self) -> None:
        """Switch the disk to the commit base (after READY); COMPLETED follows."""
        try:
            self.domain().blockJobAbort(self.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as exc:
            raise BlockJobFailed(
                f"pivot of {self.dom_name}:{self.target} failed: {_msg(exc)}"
            ) from exc

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Change the running job's speed limit (0 = unlimited)."""
        self.domain().blockJobSetSpeed(
            self.target, bytes_per_second, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
        )

    def _abort_quietly(self) -> None:
        try:
            self.domain().blockJobAbort(self.target, 0)
        except libvirt.libvirtError as exc:
            LOG.warning("abort of %r failed: %s", self, exc)
        self._finished = True

    # -- events ------------------------------------------------------------------------
    def _deliver(self, job_type: int, status: int) -> None:
        if job_type != self.job_type:
            return
        try:
            end = JobEnd(status)
        except ValueError:
            return
        with self._cond:
            self._events.append(end)
            self._cond.notify_all()

    def _request_recheck(self) -> None:
        with self._cond:
            self._recheck = True
            self._cond.notify_all()

    def wait(self, wanted: frozenset[JobEnd]) -> JobEnd:
        """Block until an event in ``wanted`` or a terminal one; the deadline is the options'.

        Returns the event (VANISHED when the job disappeared without one). Cancel requests
        abort the job and the wait goes on to its CANCELED event. Raises Timeout after
        aborting the job when the deadline passes.
        """
        if not self._started:
            raise RuntimeError("wait() before start()")
        opts = self.options
        deadline = time.monotonic() + opts.timeout
        next_progress = time.monotonic() if opts.progress is not None else None
        retry_at: float | None = None
        cancel_sent = False
        while True:
            with self._cond:
                while self._events:
                    ev = self._events.popleft()
                    if ev in wanted or ev in _TERMINAL:
                        if ev in _TERMINAL:
                            self._finished = True
                        return ev
                recheck, self._recheck = self._recheck, False
            now = time.monotonic()
            if opts.cancel is not None and opts.cancel.cancelled and not cancel_sent:
                cancel_sent = True
                self._abort_async()
            if recheck or (retry_at is not None and now >= retry_at):
                retry_at = None
                try:
                    ended = self._recheck_job(wanted)
                except (libvirt.libvirtError, LibvirtUnavailable) as exc:
                    LOG.info("re-check of %r not possible yet: %s", self, exc)
                    retry_at = now + _RECHECK_RETRY
                    ended = None
                if ended is not None:
                    return ended
            if next_progress is not None and now >= next_progress:
                self._report_progress()
                next_progress = now + opts.progress_interval
            if now >= deadline:
                self._abort_quietly()
                raise Timeout(f"{self!r} did not end within {opts.timeout} s")
            wake = [deadline]
            if next_progress is not None:
                wake.append(next_progress)
            if retry_at is not None:
                wake.append(retry_at)
            with self._cond:
                if not self._events and not self._recheck:
                    self._cond.wait(max(0.0, min(wake) - time.monotonic()))

    def _abort_async(self) -> None:
        try:
            self.domain().blockJobAbort(self.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC)
        except libvirt.libvirtError as exc:
            LOG.warning("cancel of %r failed: %s", self, exc)

    def _report_progress(self) -> None:
        try:
            info = self.info()
        except (libvirt.libvirtError, LibvirtUnavailable):
            return
        if info:
            self._note(info)
            if self.options.progress is not None:
                self.options.progress(info.get("cur", 0), info.get("end", 0))

    def _note(self, info: dict[str, int]) -> None:
        self.last_cur = info.get("cur", self.last_cur)
        self.last_end = info.get("end", self.last_end)

    def _recheck_job(self, wanted: frozenset[JobEnd]) -> JobEnd | None:
        """After a reconnect: is the job still there, ready, or gone with its event lost?"""
        info = self.info()
        if info:
            self._note(info)
            end = info.get("end", 0)
            # libvirt reports cur == end (end > 0) only once a mirror job is READY.
            if JobEnd.READY in wanted and end > 0 and info.get("cur") == end:
                return JobEnd.READY
            return None
        with self._cond:  # gone: its event may still be on the way
            if not self._events:
                self._cond.wait(_LATE_EVENT_GRACE)
            if self._events:
                return None  # handled by the main loop
        LOG.warning("%r vanished without an event (libvirtd restart?)", self)
        self.event_lost = True
        self._finished = True
        return JobEnd.VANISHED

    def snapshot_info(self) -> None:
        """Record cur/end now (e.g. at READY, when the job's total is final)."""
        try:
            info = self.info()
        except (libvirt.libvirtError, LibvirtUnavailable):
            return
        if info:
            self._note(info)
