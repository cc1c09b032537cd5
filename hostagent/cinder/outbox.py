"""Status reports to Cinder that survive failures: journaled first, retried until sent.

Cinder waits for ``creating``/``deleting`` + ``90%`` (up to 600 s / 7200 s); a report lost
because Cinder's API blinked would leave it waiting to its timeout and then fail a snapshot
that exists. So every report is written to the journal before it is sent, a failed one
stays PENDING with a backoff, a background thread resends due ones, and on agent start
everything still pending is resent. Record changes owed for agent-owned snapshots
(:class:`hostagent.cinder.records.MetaAction`: finalize, delete-metadata) travel the same way.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Protocol

from hostagent.cinder.records import ActiveFile, MetaAction, MetaError
from hostagent.cinder.status import NotifyError, NotifyRejected, Report, Reported
from hostagent.journal.store import Journal, backoff

LOG = logging.getLogger(__name__)


class Notifier(Protocol):
    """The part of :class:`hostagent.cinder.status.CinderNotifier` the queue uses."""

    def report_create_done(self, snapshot_id: str) -> Reported: ...
    def report_create_failed(self, snapshot_id: str) -> Reported: ...
    def report_delete_done(self, snapshot_id: str) -> Reported: ...
    def report_delete_failed(self, snapshot_id: str) -> Reported: ...


class MetaClient(Protocol):
    """The part of :class:`hostagent.cinder.records.CinderMeta` the agent uses."""

    def create(
        self, snapshot_id: str, volume_id: str, description: str, *, checkpoint: bool = False
    ) -> None: ...
    def apply(
        self, snapshot_id: str, action: MetaAction, active: ActiveFile | None = None
    ) -> None: ...


class NoCinder:
    """The :class:`Notifier` of an agent with ``[cinder] enabled = false`` (no volume
    service, so no assisted snapshot either): it needs no endpoint and refuses to report."""

    def _refuse(self, snapshot_id: str, report: Report) -> Reported:
        raise NotifyRejected(snapshot_id, report, 0, 0, "[cinder] enabled is false")

    def report_create_done(self, snapshot_id: str) -> Reported:
        return self._refuse(snapshot_id, Report.CREATE_DONE)

    def report_create_failed(self, snapshot_id: str) -> Reported:
        return self._refuse(snapshot_id, Report.CREATE_FAILED)

    def report_delete_done(self, snapshot_id: str) -> Reported:
        return self._refuse(snapshot_id, Report.DELETE_DONE)

    def report_delete_failed(self, snapshot_id: str) -> Reported:
        return self._refuse(snapshot_id, Report.DELETE_FAILED)


def _send(notifier: Notifier, snapshot_id: str, report: Report) -> Reported:
    calls = {
        Report.CREATE_DONE: notifier.report_create_done,
        Report.CREATE_FAILED: notifier.report_create_failed,
        Report.DELETE_DONE: notifier.report_delete_done,
        Report.DELETE_FAILED: notifier.report_delete_failed,
    }
    return calls[report](snapshot_id)


class NotifyQueue:
    """Journal-backed delivery of :class:`Report`s; ``start()`` runs the resend thread."""

    def __init__(
        self,
        journal: Journal,
        notifier: Notifier,
        *,
        meta: MetaClient | None = None,
        poll_interval: float = 1.0,
        rejected_retry: float = 300.0,
    ) -> None:
        self._journal = journal
        self._notifier = notifier
        self._meta = meta
        self._poll = poll_interval
        self._rejected_retry = rejected_retry
        self._send_lock = threading.Lock()  # one delivery at a time: no duplicate sends
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, snapshot_id: str, report: Report, op_id: uuid.UUID | None = None) -> bool:
        """Journal ``report`` then try it once; False = left pending for the resend thread."""
        status, progress = report.value
        note = self._journal.enqueue(snapshot_id, status, progress, op_id)
        return self._deliver(note.id, snapshot_id, report)

    @property
    def meta(self) -> MetaClient | None:
        """Cinder's record client for agent-owned snapshots; None when ``[cinder] enabled``
        is false (no volume service: ledgers are still kept, no call is made)."""
        return self._meta

    def send_meta(
        self,
        snapshot_id: str,
        action: MetaAction,
        op_id: uuid.UUID | None,
        active: ActiveFile | None = None,
    ) -> bool:
        """Journal a record change then try it once; False = left pending for a resend.
        ``active`` (a delete) travels in the notice's progress slot, unused by meta actions."""
        if self._meta is None:
            raise RuntimeError("no Cinder record client: [cinder] enabled is false")
        detail = active.encode() if active is not None else None
        note = self._journal.enqueue(snapshot_id, action.value, detail, op_id)
        return self._deliver(note.id, snapshot_id, action, detail)

    def _do(self, snapshot_id: str, what: Report | MetaAction, detail: str | None) -> None:
        if isinstance(what, Report):
            _send(self._notifier, snapshot_id, what)
        elif self._meta is None:  # journaled by an agent that had Cinder enabled
            raise MetaError(snapshot_id, what.value, "[cinder] enabled is false", rejected=True)
        else:
            self._meta.apply(snapshot_id, what, ActiveFile.decode(detail))

    def _deliver(
        self,
        note_id: int,
        snapshot_id: str,
        report: Report | MetaAction,
        detail: str | None = None,
    ) -> bool:
        with self._send_lock:
            if self._journal.notification(note_id).state.value != "pending":
                return True  # sent meanwhile by the other path
            try:
                self._do(snapshot_id, report, detail)
            except (NotifyError, MetaError) as exc:
                attempts = self._journal.notification(note_id).attempts + 1
                rejected = isinstance(exc, NotifyRejected) or (
                    isinstance(exc, MetaError) and exc.rejected
                )
                retry = self._rejected_retry if rejected else backoff(attempts)
                self._journal.mark_failed(note_id, exc, retry_in=retry)
                LOG.error(
                    "report %s for %s not delivered (retry in %.0fs): %s",
                    report.name,
                    snapshot_id,
                    retry,
                    exc,
                )
                return False
            except Exception as exc:  # e.g. a client bug: still keep the notice
                self._journal.mark_failed(note_id, exc)
                LOG.exception("report %s for %s raised", report.name, snapshot_id)
                return False
            self._journal.mark_sent(note_id)
            return True

    def flush(self, *, due_only: bool = True) -> int:
        """Try every pending (due) notice once; returns how many were delivered."""
        sent = 0
        for note in self._journal.pending_notifications(due_only=due_only):
            if self._stop.is_set():
                break
            meta = MetaAction.of(note.status)
            if meta is not None:
                sent += self._deliver(note.id, note.snapshot_id, meta, note.progress)
            else:
                report = Report((note.status, note.progress))
                sent += self._deliver(note.id, note.snapshot_id, report)
        return sent

    def start(self) -> None:
        """Resend everything left pending by an earlier run, then keep resending due ones."""
        self._thread = threading.Thread(target=self._loop, name="qsnap-notify", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self.flush(due_only=not first)
                first = False
            except Exception:
                LOG.exception("notification resend pass failed")
            self._wake.wait(self._poll)
            self._wake.clear()
