"""The one lower -> wire error mapping: classes and exact messages, at the edge and before it."""

from __future__ import annotations

import pytest

from hostagent.backup import repo as bk
from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import Rule, to_wire, wire_error, wire_errors
from libvirt_ops import ChainMismatch, DiskBusy, DiskNotFound, DomainNotFound
from qcow2.errors import Qcow2Error, SnapshotExists, SnapshotNotFound, UnsafeImage


@pytest.mark.parametrize(
    ("lower", "wire", "message"),
    [
        (DiskBusy("job"), api.DiskBusy, "job"),
        (DiskNotFound("vol"), api.VolumeNotFound, "vol"),
        (DomainNotFound("dom"), api.InstanceNotFound, "dom"),
        (ChainMismatch("xml"), api.InvalidRequest, "xml"),
        (UnsafeImage("/p", "rule", "why"), api.InvalidRequest, "/p: unsafe image (rule): why"),
        (SnapshotExists("s"), api.InvalidRequest, "s"),
        (SnapshotNotFound("s"), api.InvalidRequest, "s"),
        (bk.BackupNotFound("no b"), api.BackupNotFound, "no b"),
        (bk.RepositoryBusy("gc"), api.DiskBusy, "backup repository busy: gc"),
        (bk.FormatError("v9"), api.InvalidRequest, "backup repository refused: v9"),
        (KeyError("k"), api.AgentInternalError, "Internal error in the host agent (error id "),
        (bk.CorruptChunk("c", "/r", "bad"), api.AgentInternalError, "Internal error in the host"),
    ],
)
def test_to_wire_class_and_message(lower: Exception, wire: type, message: str) -> None:
    typed = to_wire(lower)
    assert type(typed) is wire
    assert str(typed).startswith(message) and typed.message == str(typed)
    assert typed.args == (typed.message,)  # message only: oslo.messaging rebuilds it


def test_wire_errors_pass_through_unchanged() -> None:
    own = api.OperationNotFound("op")
    assert to_wire(own) is own and wire_error(own) is own
    assert wire_error(RuntimeError("x")) is None


def test_wire_errors_maps_and_chains() -> None:
    cause = bk.RepositoryBusy("gc")
    with pytest.raises(api.DiskBusy) as info, wire_errors():
        raise cause
    assert info.value.__cause__ is cause
    with pytest.raises(api.OperationNotFound) as hidden, wire_errors(chain=False):
        raise api.OperationNotFound("op")
    assert hidden.value.__cause__ is None
    with pytest.raises(RuntimeError), wire_errors():  # unmapped: left for the endpoint
        raise RuntimeError("bug")


def test_a_call_site_rule_comes_first() -> None:
    rule = Rule(Qcow2Error, api.InvalidRequest, "new_file 'f' refused: {exc}")
    with pytest.raises(api.InvalidRequest) as info, wire_errors(rule, chain=False):
        raise SnapshotExists("s")  # RULES maps it too, with the bare message
    assert info.value.message == "new_file 'f' refused: s"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_caller_text_never_goes_through_format() -> None:
    """A name with braces from the wire ends up verbatim; a template would raise."""
    sent = "volume-{exc}.{0}"
    rule = Rule(Qcow2Error, api.InvalidRequest, lambda e: f"new_file {sent!r} refused: {e}")
    with pytest.raises(api.InvalidRequest) as info, wire_errors(rule):
        raise SnapshotExists("bad")
    assert info.value.message == "new_file 'volume-{exc}.{0}' refused: bad"
    with pytest.raises((IndexError, KeyError)):  # negative control: as a template it breaks
        Rule(Qcow2Error, api.InvalidRequest, f"new_file {sent!r} {{exc}}").apply(
            SnapshotExists("x")
        )


def test_reused_id_and_tuple_rules() -> None:
    from hostagent.journal.store import UnknownOperation
    from hostagent.rpc.wire_errors import REUSED_ID

    class Reused(REUSED_ID.lower):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            Exception.__init__(self, "k")

    with pytest.raises(api.InvalidRequest, match="snapshot id reused with another request: k"):
        with wire_errors(REUSED_ID):
            raise Reused()
    unknown = Rule((ValueError, UnknownOperation), api.OperationNotFound, lambda _: "no op x")
    for exc in (ValueError("badly formed"), UnknownOperation("x")):
        with pytest.raises(api.OperationNotFound, match="no op x"), wire_errors(unknown):
            raise exc
