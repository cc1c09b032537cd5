"""Issue 14: an unexpected failure reaches the caller as an error id and a generic message;
its text, paths and traceback stay in the agent's log under that id (nothing of it crosses
the bus, the serialized traceback included)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from oslo_messaging._drivers import common as om_common

from hostagent.rpc import contract as api
from hostagent.rpc.messaging import messaging
from hostagent.rpc.server import AgentEndpoint
from hostagent.rpc.wire_errors import INTERNAL_MESSAGE, internal_error, to_wire
from libvirt_ops import DiskBusy

om = messaging()
VOL = "11111111-1111-4111-8111-111111111111"
SNAP = "55555555-5555-4555-8555-555555555555"
GOOD = {"snapshot_id": SNAP, "type": "qcow2", "new_file": f"volume-{VOL}.{SNAP}"}
LEAKED_PATH = "/srv/qsnap-private/share-a/volume-x.secret"
_ID = re.compile(r"error id ([0-9a-f]{32})")


class Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def create_assisted_snapshot(self, ctxt: Any, req: Any) -> api.Operation:
        raise self.exc


def _call(exc: BaseException) -> om.ExpectedException:
    ep = AgentEndpoint(Raising(exc))  # type: ignore[arg-type]
    with pytest.raises(om.ExpectedException) as info:
        ep.create_assisted_snapshot({}, VOL, GOOD)
    return info.value


@pytest.mark.parametrize(
    "lower",
    [
        PermissionError(13, "Permission denied", LEAKED_PATH),
        KeyError(LEAKED_PATH),
        RuntimeError(f"qemu-img failed on {LEAKED_PATH}"),
    ],
)
def test_unexpected_error_sends_an_id_and_logs_the_details(
    lower: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hostagent.rpc.server")
    sent = _call(lower)
    typed = sent.exc_info[1]
    assert type(typed) is api.AgentInternalError
    found = _ID.search(typed.message)
    assert found is not None and LEAKED_PATH not in typed.message
    assert typed.message == INTERNAL_MESSAGE.format(error_id=found.group(1))
    assert typed.args == (typed.message,)  # rebuildable from args alone
    # what oslo.messaging puts on the bus: message, args AND the formatted traceback
    wire = om_common.serialize_remote_exception(sent.exc_info)
    assert LEAKED_PATH not in wire and found.group(1) in wire
    assert json.loads(wire)["class"] == "AgentInternalError"
    rebuilt = om_common.deserialize_remote_exception(wire, [api.ERRORS_MODULE])
    assert isinstance(rebuilt, api.AgentInternalError) and LEAKED_PATH not in str(rebuilt)
    # the agent's log has both, with the traceback
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert len(logged) == 1 and LEAKED_PATH in logged[0].getMessage()
    assert logged[0].exc_info is not None and logged[0].exc_info[1] is lower


def test_each_failure_gets_its_own_id() -> None:
    ids = {_ID.search(_call(KeyError("k")).exc_info[1].message).group(1) for _ in range(3)}  # type: ignore[union-attr]
    assert len(ids) == 3


def test_to_wire_uses_a_given_id() -> None:
    typed = to_wire(KeyError(LEAKED_PATH), error_id="ab" * 16)
    assert typed.message == internal_error("ab" * 16).message
    assert LEAKED_PATH not in typed.message


def test_control_expected_errors_keep_their_message(caplog: pytest.LogCaptureFixture) -> None:
    """Negative control: a mapped error still tells the caller what was wrong."""
    caplog.set_level(logging.ERROR, logger="hostagent.rpc.server")
    typed = _call(DiskBusy(f"block job on {LEAKED_PATH}")).exc_info[1]
    assert type(typed) is api.DiskBusy and typed.message == f"block job on {LEAKED_PATH}"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    own = api.InvalidRequest("new_file is not in the chain")
    assert _call(own).exc_info[1] is own
