"""One backup create request: its volumes run ``max_parallel`` at a time, then it finishes.

The request-level operation's steps (``volume`` per disk), summed progress and result
gather the volumes'; a cancel lets running volumes stop at their next chunk and queued ones
never start. Driven by :class:`hostagent.backup.service.BackupService` (its journal, pool,
locks and engine).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hostagent.backup import repo as bk
from hostagent.backup.live import BackupEngine, BackupSettings, Cancel, Progress
from hostagent.hypervisor import DiskLocks, Hypervisor, Located
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.model import StepName
from hostagent.pool import KeyedPool

LOG = logging.getLogger(__name__)


class _Throttle:
    """Sums the volumes' progress into the request's, journaled at most once a second."""

    def __init__(self, journal: jn.Journal, op_id: uuid.UUID) -> None:
        self._j, self._op = journal, op_id
        self._lock = threading.Lock()
        self._parts: dict[str, tuple[int, int]] = {}
        self._last = 0.0

    def part(self, key: str) -> Progress:
        def report(done: int, total: int) -> None:
            with self._lock:
                self._parts[key] = (done, total)
                now = time.monotonic()
                if now - self._last < 1.0 and done < total:
                    return
                self._last = now
                cur = sum(d for d, _ in self._parts.values())
                end = sum(t for _, t in self._parts.values())
            with contextlib.suppress(jn.JournalError):  # advisory; never fail a backup for it
                self._j.set_progress(self._op, cur, end)

        return report


@dataclass(frozen=True)
class RunDeps:
    """What a create run uses of the backup service, handed over explicitly (the service
    builds it once; the run never reaches into the service's private state)."""

    j: jn.Journal
    hv: Hypervisor
    pool: KeyedPool
    locks: DiskLocks
    engine: BackupEngine
    settings: BackupSettings
    cancelled: Callable[[uuid.UUID], bool]
    stream_progress: Callable[[Progress, Cancel], Progress]
    finish_cancelled: Callable[[uuid.UUID, dict[str, Any], str], None]
    forget: Callable[[uuid.UUID], None]


class CreateRun:
    """One create request: its volumes launched ``max_parallel`` at a time, then finished."""

    def __init__(
        self, svc: RunDeps, op_id: uuid.UUID, found: list[Located], incremental: bool
    ) -> None:
        self._svc, self._op, self._incremental = svc, op_id, incremental
        self._todo = list(found)
        self._skipped: list[str] = []  # queued when cancelled: never started
        self._running = 0
        self._done = False
        self._results: list[dict[str, Any]] = []
        self._errors: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._progress = _Throttle(svc.j, op_id)

    def launch(self) -> None:
        """Submit volumes until ``max_parallel`` run; the last one to end finishes the op."""
        finish = False
        with self._lock:
            batch: list[Located] = []
            if self._todo and self._svc.cancelled(self._op):
                self._skipped += [str(w.disk.serial).lower() for w in self._todo]
                self._todo.clear()
            while self._todo and self._running < self._svc.settings.max_parallel:
                batch.append(self._todo.pop(0))
                self._running += 1
            finish = not self._running and not self._todo and not self._done
            self._done = self._done or finish
        for where in batch:
            self._svc.pool.submit(where.key, functools.partial(self._one, where))
        if finish:
            self._finish()

    def _one(self, where: Located) -> None:
        svc, vid = self._svc, str(where.disk.serial).lower()

        def cancel() -> bool:
            return svc.cancelled(self._op)

        try:
            with svc.locks.hold([where.key]):
                if cancel():  # cancelled while it waited for the disk: never starts
                    with self._lock:
                        self._skipped.append(vid)
                else:
                    self._backup(where, vid, cancel)
        except Exception as exc:
            if isinstance(exc, bk.BackupCancelled) and cancel():
                LOG.info("backup of volume %s cancelled: %s", vid, exc)
                with self._lock:
                    self._skipped.append(vid)
            else:
                LOG.warning("backup of volume %s failed: %s", vid, exc)
                with self._lock:
                    self._errors.append({"volume_id": vid, "error": f"{type(exc).__name__}: {exc}"})
        with self._lock:
            self._running -= 1
        self.launch()

    def _backup(self, where: Located, vid: str, cancel: Cancel) -> None:
        svc = self._svc
        with svc.j.step(self._op, StepName.VOLUME, {"volume_id": vid, "disk": where.key}) as h:
            # the chain may have moved while queued: locate again under the lock
            now = svc.hv.locate(vid)
            progress = svc.stream_progress(self._progress.part(vid), cancel)
            out = svc.engine.backup(
                now, self._incremental, svc.settings.repository, progress, cancel
            )
            h.data.update(out)
        with self._lock:
            self._results.append(out)

    def _finish(self) -> None:
        j, op = self._svc.j, self._op
        order = {v: i for i, v in enumerate(j.get(op).request.get("volume_ids", []))}
        backups = sorted(self._results, key=lambda r: order.get(r["volume_id"], 0))
        result: dict[str, Any] = {"backups": backups}
        if self._svc.cancelled(op) and self._skipped:  # all done anyway: not "cancelled"
            if self._errors:
                result["failed"] = self._errors
            result["cancelled"] = sorted(self._skipped, key=lambda v: order.get(v, 0))
            done = ", ".join(b["volume_id"] for b in backups) or "none"
            what = f"volumes whose backup was published stay published ({done})"
            self._svc.finish_cancelled(op, result, what)
        elif self._errors:
            result["failed"] = self._errors
            names = ", ".join(f"{e['volume_id']}: {e['error']}" for e in self._errors)
            err = ops.ErrorInfo("BackupFailed", f"{len(self._errors)} volume(s) failed: {names}")
            j.finish(op, ops.OperationState.FAILED, result=result, error=err)
        else:
            j.finish(op, ops.OperationState.SUCCEEDED, result=result)
        self._svc.forget(op)
