"""The journal's errors, rooted at :class:`JournalError` (itself a ``QsnapAgentError``).

Kept apart from the store's modules so each table's code raises the same classes and
callers keep catching them as ``hostagent.journal.store.JournalError`` and friends.
"""

from __future__ import annotations

from hostagent.errors import QsnapAgentError
from hostagent.journal.model import JsonDict, Operation

__all__ = ["IdempotencyConflict", "InvalidTransition", "JournalError", "UnknownOperation"]


class JournalError(QsnapAgentError):
    """Base of the journal's errors."""


class UnknownOperation(JournalError):
    """No operation (or step, or notification) with that id is journaled."""


class InvalidTransition(JournalError):
    """The requested state change is not allowed from the current state."""


class IdempotencyConflict(JournalError):
    """The idempotency key is already used by an operation with a different request."""

    def __init__(self, existing: Operation, request: JsonDict) -> None:
        self.existing = existing
        self.request = request
        super().__init__(
            f"{existing.kind} key {existing.idempotency_key!r} already names operation "
            f"{existing.id} with a different request"
        )
