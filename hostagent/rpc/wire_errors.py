"""The one place where lower-layer errors become the wire errors of :mod:`.contract`.

The layers below the RPC (``libvirt_ops``, ``qcow2``, the backup repository) raise their
own errors; a caller across the wire must get a typed error it can act on (retry later,
fix the request) rather than an internal one. :data:`RULES` is that mapping, in order
(the first rule whose ``lower`` matches wins). The endpoint sends everything through
:func:`to_wire`; code that must map before the edge (the backup service, whose workers
journal the wire error) wraps the call in :func:`wire_errors`. A call site whose message
must name what the caller sent passes its own :class:`Rule` first.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from hostagent.backup import repo as bk
from hostagent.journal.errors import IdempotencyConflict
from hostagent.rpc import contract as api
from libvirt_ops import ChainMismatch, DiskBusy, DiskNotFound, DomainNotFound
from qcow2.errors import SnapshotExists, SnapshotNotFound, UnsafeImage

__all__ = [
    "INTERNAL_MESSAGE",
    "REUSED_ID",
    "RULES",
    "Rule",
    "internal_error",
    "new_error_id",
    "to_wire",
    "wire_error",
    "wire_errors",
]

#: What a caller learns of an unexpected failure: nothing but an id. The exception text
#: (which may name paths, hosts, internal state) stays in the agent's log under that id.
#: qsnap-api recognises this exact text (api_ext/app.py) and passes it on unchanged.
INTERNAL_MESSAGE = (
    "Internal error in the host agent (error id {error_id}); the details are in that agent's "
    "log under this id."
)


@dataclass(frozen=True)
class Rule:
    """``lower`` (a class or a tuple of them, subclasses included) is sent as ``wire``.

    ``message`` is a template formatting ``{exc}``, or a function of the error (for a
    message that names what the caller sent: no caller text ever goes through ``format``).
    """

    lower: type[Exception] | tuple[type[Exception], ...]
    wire: type[api.AgentRpcError]
    message: str | Callable[[Exception], str] = "{exc}"

    def apply(self, exc: Exception) -> api.AgentRpcError:
        if callable(self.message):
            return self.wire(self.message(exc))
        return self.wire(self.message.format(exc=exc))


#: An idempotency key (snapshot id) reused with a different request.
REUSED_ID = Rule(
    IdempotencyConflict, api.InvalidRequest, "snapshot id reused with another request: {exc}"
)


#: Lower errors that mean "this request is wrong or must wait", never "agent broken".
RULES: tuple[Rule, ...] = (
    # the hypervisor: the disk is busy, or the request names what is not on this host
    Rule(DiskBusy, api.DiskBusy),
    Rule(DiskNotFound, api.VolumeNotFound),
    Rule(DomainNotFound, api.InstanceNotFound),
    Rule(ChainMismatch, api.InvalidRequest),
    # qcow2 inspection: a file the agent refuses to touch
    Rule(UnsafeImage, api.InvalidRequest),
    Rule(SnapshotExists, api.InvalidRequest),
    Rule(SnapshotNotFound, api.InvalidRequest),
    # the backup repository
    Rule(bk.BackupNotFound, api.BackupNotFound),
    Rule(bk.RepositoryBusy, api.DiskBusy, "backup repository busy: {exc}"),
    Rule(bk.FormatError, api.InvalidRequest, "backup repository refused: {exc}"),
)


def wire_error(exc: BaseException, rules: Iterable[Rule] = RULES) -> api.AgentRpcError | None:
    """The wire error of ``exc`` by the first matching rule; None when no rule maps it."""
    if isinstance(exc, api.AgentRpcError):
        return exc
    if isinstance(exc, Exception):
        for rule in rules:
            if isinstance(exc, rule.lower):
                return rule.apply(exc)
    return None


def new_error_id() -> str:
    """A fresh id for one unexpected failure (32 hex digits)."""
    return uuid.uuid4().hex


def internal_error(error_id: str) -> api.AgentInternalError:
    """The generic wire error for the failure logged under ``error_id``."""
    return api.AgentInternalError(INTERNAL_MESSAGE.format(error_id=error_id))


def to_wire(exc: BaseException, error_id: str | None = None) -> api.AgentRpcError:
    """What the endpoint sends for ``exc``: unmapped errors become ``AgentInternalError``
    with only an id (``error_id``, else a new one); the caller logs ``exc`` under it."""
    typed = wire_error(exc)
    if typed is not None:
        return typed
    return internal_error(error_id or new_error_id())


@contextlib.contextmanager
def wire_errors(*first: Rule, chain: bool = True) -> Iterator[None]:
    """Re-raise a mapped error as its wire error (``first`` rules before :data:`RULES`).

    Unmapped errors pass unchanged, so the endpoint still logs them as unexpected. With
    ``chain`` False the wire error hides its cause (``raise ... from None``).
    """
    try:
        yield
    except api.AgentRpcError:
        raise
    except Exception as exc:
        typed = wire_error(exc, (*first, *RULES))
        if typed is None:
            raise
        if chain:
            raise typed from exc
        raise typed from None
