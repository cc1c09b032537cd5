"""Crash recovery: finish or honestly fail every operation an earlier agent left unfinished.

:func:`reconcile` runs at agent start BEFORE the RPC server accepts requests, so a retry by
Cinder (same snapshot id) finds the reconciled operation, never a stuck RUNNING one. It only
orders the work: each operation kind's resume lives with its run and is registered here by
kind (:meth:`hostagent.service.AssistedService.resumers`):

- assisted create/delete: :meth:`hostagent.snapshots.assisted.AssistedSnapshots.resume`
  (judged at once from the steps and the live chain; merges go to the pool);
- instance snapshots and owned deletes: :meth:`hostagent.snapshots.owned.OwnedOps.resume_later`
  (resumed in the pool with the step code of a fresh run);
- backups, verifies, prunes and restores: :func:`hostagent.backup.service.resume`
  (one volume's online backup: published or failed, its chain changes being owned
  operations that resume themselves; a request-level operation failed as
  interrupted, an interrupted restore's temporary files removed).

A kind nobody registered is failed as not recoverable (its PLANNED steps undone). One
operation's error never stops the others: it stays unfinished for the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping

from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import CRASH_ENV as CRASH_ENV  # re-exported for tests and tools
from hostagent.journal.crash import crash_point as crash_point

LOG = logging.getLogger(__name__)

#: Decides one unfinished operation (long work goes to the pool); returns the decision.
Resume = Callable[[ops.OperationRecord], str]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What recovery decided for one operation (logged, and asserted by unit tests)."""

    op_id: uuid.UUID
    kind: ops.OperationKind
    decision: str


def _not_recoverable(journal: jn.Journal, rec: ops.OperationRecord) -> str:
    op = rec.operation
    for s in rec.steps:
        if s.state is ops.StepState.PLANNED:
            journal.step_undone(op.id, s.seq, {"recovery": "kind not recoverable"})
    err = ops.ErrorInfo("RecoveredFailure", f"{op.kind} cannot be resumed after a restart")
    journal.finish(op.id, ops.OperationState.FAILED, error=err)
    return "failed: kind not recoverable"


def reconcile(journal: jn.Journal, resumers: Mapping[ops.OperationKind, Resume]) -> list[Outcome]:
    """Decide every unfinished operation, in journal order, by its kind's resume.

    Call before the RPC server starts and before the notify queue's ``start()`` (which then
    delivers every report owed here). Request-level backup operations are failed after the
    volumes' own (journal order).
    """
    out: list[Outcome] = []
    for record in journal.unfinished():
        op = record.operation
        try:
            resume = resumers.get(op.kind)
            if resume is None:
                decision = _not_recoverable(journal, record)
            else:
                decision = resume(record)
        except Exception as exc:  # keep going; the op stays unfinished for the next start
            LOG.exception("recovery of %s %s failed", op.kind, op.id)
            decision = f"recovery raised {type(exc).__name__}: {exc}"
        LOG.warning("recovered %s %s: %s", op.kind, op.id, decision)
        out.append(Outcome(op.id, op.kind, decision))
    return out
