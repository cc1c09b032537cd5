"""The nova-free half of qsnap's driver in nova-compute: the delegate that runs Nova's assisted
snapshot on the agent and waits for it, and the BDM refresh endpoint the agent calls."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from api_ext import nova_agent
from api_ext.nova_agent import (
    AgentDelegate,
    AgentOperationFailed,
    AgentRefused,
    NovaSideEndpoint,
    RefreshRefused,
    bdm_state,
    check_uuid,
)
from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport, om
from hostagent.rpc.nova_side import TOPIC, VERSION, BdmState, NovaSideAPI

VOL = "11111111-1111-4111-8111-111111111111"
SNAP = "55555555-5555-4555-8555-555555555555"
INST = "44444444-4444-4444-8444-444444444444"
CTX = {"request_id": "req-nova", "user_id": "u", "project_id": "p"}
CREATE = {"snapshot_id": SNAP, "type": "qcow2", "new_file": f"volume-{VOL}.{SNAP}"}
DELETE = {"volume_id": VOL, "type": "qcow2", "file_to_merge": None, "merge_target_file": None}


def _op(state: str, error: dict[str, str] | None = None) -> api.Operation:
    return api.Operation(
        id="op-7",
        kind=api.OperationKind.CREATE_ASSISTED,
        state=api.OperationState(state),
        host="h",
        error=error,
    )


class FakeAgent:
    """Answers the start with ``start``; then ``get_operation`` pops ``polls`` (the last one
    repeats). An exception in either place is raised instead."""

    def __init__(self, start: api.Operation | BaseException, *polls: Any) -> None:
        self.start, self.polls = start, list(polls)
        self.calls: list[tuple[Any, ...]] = []

    def _started(self) -> api.Operation:
        if isinstance(self.start, BaseException):
            raise self.start
        return self.start

    def create_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        create_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = api.Reporter.CINDER,
    ) -> api.Operation:
        self.calls.append(("create", dict(ctxt), volume_id, dict(create_info), reporter))
        return self._started()

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = api.Reporter.CINDER,
    ) -> api.Operation:
        self.calls.append(
            ("delete", dict(ctxt), volume_id, snapshot_id, dict(delete_info), reporter)
        )
        return self._started()

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation:
        self.calls.append(("get", op_id))
        out = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        if isinstance(out, BaseException):
            raise out
        assert isinstance(out, api.Operation)
        return out


class Clock:
    """A monotonic clock that only ``sleep`` advances."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _delegate(agent: nova_agent.AgentLike, clock: Clock, **bounds: float) -> AgentDelegate:
    return AgentDelegate(
        agent,
        create_timeout=bounds.get("create_timeout", 30.0),
        delete_timeout=bounds.get("delete_timeout", 300.0),
        poll_interval=bounds.get("poll_interval", 2.0),
        sleep=clock.sleep,
        clock=clock,
    )


# -- the delegate -------------------------------------------------------------------------
def test_create_starts_with_reporter_nova_and_polls_until_succeeded() -> None:
    agent = FakeAgent(_op("queued"), _op("running"), _op("succeeded"))
    clock = Clock()
    op = _delegate(agent, clock).create(CTX, VOL, CREATE)
    assert op.state is api.OperationState.SUCCEEDED
    assert agent.calls == [
        ("create", CTX, VOL, CREATE, api.Reporter.NOVA),
        ("get", "op-7"),
        ("get", "op-7"),
    ]
    assert clock.sleeps == [2.0, 2.0]


def test_an_operation_ended_in_the_start_answer_is_not_polled() -> None:
    agent = FakeAgent(_op("succeeded"), _op("failed"))
    clock = Clock()
    assert _delegate(agent, clock).create(CTX, VOL, CREATE).state is api.OperationState.SUCCEEDED
    assert [c[0] for c in agent.calls] == ["create"] and clock.sleeps == []


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_an_operation_that_did_not_succeed_names_its_id_state_and_the_agents_error(
    state: str,
) -> None:
    err = {"code": "DiskBusy", "message": "a block job holds vdb"}
    agent = FakeAgent(_op("queued"), _op(state, err))
    with pytest.raises(AgentOperationFailed) as info:
        _delegate(agent, Clock()).create(CTX, VOL, CREATE)
    exc = info.value
    assert (exc.op_id, exc.state) == ("op-7", state)
    assert str(exc) == f"qsnap agent operation op-7 {state}: DiskBusy: a block job holds vdb"


def test_a_failed_operation_without_error_details_still_says_so() -> None:
    with pytest.raises(AgentOperationFailed, match="op-7 failed: no error code: no message"):
        _delegate(FakeAgent(_op("failed")), Clock()).create(CTX, VOL, CREATE)


def test_waiting_stops_at_the_create_timeout_and_names_the_running_operation() -> None:
    agent = FakeAgent(_op("queued"), _op("running"))
    clock = Clock()
    with pytest.raises(AgentOperationFailed) as info:
        _delegate(agent, clock, create_timeout=5.0, poll_interval=2.0).create(CTX, VOL, CREATE)
    assert info.value.state == "still running" and "within 5 s" in str(info.value)
    # never sleeps past the deadline: 2 + 2 + the 1 s left
    assert clock.sleeps == [2.0, 2.0, 1.0] and clock.now == 1005.0


def test_delete_passes_its_ids_and_uses_the_delete_timeout() -> None:
    agent = FakeAgent(_op("running"), _op("running"))
    clock = Clock()
    delegate = _delegate(agent, clock, create_timeout=1.0, delete_timeout=9.0, poll_interval=4.0)
    with pytest.raises(AgentOperationFailed):
        delegate.delete(CTX, VOL, SNAP, DELETE)
    assert agent.calls[0] == ("delete", CTX, VOL, SNAP, DELETE, api.Reporter.NOVA)
    assert clock.now == 1009.0


def test_a_poll_timeout_is_retried_within_the_deadline() -> None:
    lost = om.MessagingTimeout("no reply")
    agent = FakeAgent(_op("queued"), lost, lost, _op("succeeded"))
    op = _delegate(agent, Clock()).create(CTX, VOL, CREATE)
    assert op.state is api.OperationState.SUCCEEDED
    assert [c[0] for c in agent.calls] == ["create", "get", "get", "get"]


def test_an_agent_that_stops_answering_polls_fails_at_the_deadline() -> None:
    agent = FakeAgent(_op("running"), om.MessagingTimeout("no reply"))
    clock = Clock()
    with pytest.raises(AgentOperationFailed, match="op-7 still running"):
        _delegate(agent, clock, create_timeout=10.0, poll_interval=3.0).create(CTX, VOL, CREATE)
    assert clock.now == 1010.0 and len(agent.calls) == 1 + 4


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (api.OperationNotFound("no operation op-7"), "OperationNotFound: no operation op-7"),
        (om.MessagingException("bus down"), "MessagingException: bus down"),
    ],
)
def test_a_poll_error_other_than_a_timeout_fails_at_once(error: Exception, says: str) -> None:
    agent = FakeAgent(_op("running"), error)
    with pytest.raises(AgentOperationFailed, match=says) as info:
        _delegate(agent, Clock()).create(CTX, VOL, CREATE)
    assert info.value.state == "unknown" and len(agent.calls) == 2


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (api.VolumeNotFound(f"volume {VOL} is not attached here"), "refused .*VolumeNotFound"),
        (api.InvalidRequest("create_info.type must be 'qcow2'"), "InvalidRequest: create_info"),
        (om.MessagingTimeout("no reply"), "did not answer create_assisted_snapshot"),
        (om.RemoteError("UnsupportedVersion", "1.5"), "could not be asked"),
    ],
)
def test_a_start_the_agent_refuses_or_never_answers_is_refused_without_polling(
    error: Exception, says: str
) -> None:
    agent = FakeAgent(error, _op("succeeded"))
    clock = Clock()
    with pytest.raises(AgentRefused, match=says):
        _delegate(agent, clock).create(CTX, VOL, CREATE)
    assert [c[0] for c in agent.calls] == ["create"] and clock.sleeps == []


# -- the delegate against the real client over oslo.messaging fake:// --------------------
class Agent15:
    """What an RPC 1.5 agent serves of the assisted snapshot API (records the wire args)."""

    target = om.Target(version="1.5")

    def __init__(self) -> None:
        self.wire: list[dict[str, Any]] = []
        self.error: api.AgentRpcError | None = None

    def create_assisted_snapshot(self, ctxt: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        self.wire.append({"ctxt": ctxt, **kwargs})
        if self.error is not None:
            try:
                raise self.error
            except api.AgentRpcError:
                raise om.ExpectedException() from None
        return _op("queued").to_wire()

    def get_operation(self, ctxt: dict[str, Any], op_id: str) -> dict[str, Any]:
        return _op("succeeded").to_wire()


@pytest.fixture
def transport() -> Iterator[Any]:
    t = get_transport(make_conf(overrides={"transport_url": "fake://", "host": "h"}))
    yield t
    t.cleanup()


def _serve(transport: Any, topic: str, endpoint: object, version: str = "1.0") -> Any:
    target = om.Target(topic=topic, server="h", version=version)
    server = om.get_rpc_server(
        transport, target, [endpoint], access_policy=om.DefaultRPCAccessPolicy
    )
    server.start()
    return server


def test_reporter_nova_reaches_a_1_5_agent_and_its_typed_refusal_comes_back(
    transport: Any,
) -> None:
    agent = Agent15()
    server = _serve(transport, api.RPC_TOPIC, agent)
    try:
        delegate = _delegate(AgentAPI(transport, "h", timeout=10), Clock())
        assert delegate.create(CTX, VOL, CREATE).state is api.OperationState.SUCCEEDED
        assert agent.wire == [
            {"ctxt": CTX, "volume_id": VOL, "create_info": CREATE, "reporter": "nova"}
        ]
        agent.error = api.DiskBusy("a block job holds vdb")
        with pytest.raises(AgentRefused, match="DiskBusy: a block job holds vdb"):
            delegate.create(CTX, VOL, CREATE)
    finally:
        server.stop()
        server.wait()


# -- the endpoint the agent calls ----------------------------------------------------------
class Refresher:
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str]] = []

    def refresh(self, instance_uuid: str, volume_id: str) -> object:
        self.asked.append((instance_uuid, volume_id))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _info(**data: str) -> str:
    """connection_info as Nova stores it in the BDM: JSON text."""
    return json.dumps({"driver_volume_type": "nfs", "data": {"export": "h:/e", **data}})


def test_the_agents_client_gets_what_the_bdm_holds_after_the_refresh(transport: Any) -> None:
    refresher = Refresher(_info(name=f"volume-{VOL}.{SNAP}", format="qcow2"))
    endpoint = NovaSideEndpoint("cmp1", "qsnap.QsnapLibvirtDriver", refresher)
    server = _serve(transport, TOPIC, endpoint, VERSION)
    try:
        side = NovaSideAPI(transport, "h", timeout=10)
        assert side.ping(5) == {"host": "cmp1", "driver": "qsnap.QsnapLibvirtDriver"}
        assert side.refresh_volume(INST, VOL) == BdmState(f"volume-{VOL}.{SNAP}", "qcow2")
        assert refresher.asked == [(INST, VOL)]
    finally:
        server.stop()
        server.wait()


def _refused(endpoint: NovaSideEndpoint, instance_uuid: object, volume_id: object) -> str:
    """The message the agent receives: the endpoint's ExpectedException carries it."""
    with pytest.raises(om.ExpectedException) as info:
        endpoint.refresh_volume({}, instance_uuid, volume_id)
    exc = info.value.exc_info[1]
    assert isinstance(exc, RefreshRefused)
    return str(exc)


def test_a_refresh_nova_refuses_reaches_the_agent_as_an_expected_error() -> None:
    why = RefreshRefused(f"instance {INST} is on host 'cmp2', not 'cmp1'")
    endpoint = NovaSideEndpoint("cmp1", "d", Refresher(why))
    assert _refused(endpoint, INST, VOL) == str(why)


@pytest.mark.parametrize(
    ("instance_uuid", "volume_id", "says"),
    [
        ("nope", VOL, "instance_uuid must be a lower-case UUID"),
        ("ABCDEF01-1111-4111-8111-111111111111", VOL, "instance_uuid must be a lower-case"),
        (INST, None, "volume_id must be a lower-case UUID, got None"),
        (INST, ["x"], "volume_id must be"),
    ],
)
def test_ids_are_checked_before_nova_is_asked(
    instance_uuid: object, volume_id: object, says: str
) -> None:
    refresher = Refresher(_info(name="x", format="raw"))
    assert says in _refused(NovaSideEndpoint("cmp1", "d", refresher), instance_uuid, volume_id)
    assert refresher.asked == []


def test_check_uuid_answers_a_valid_id_as_is() -> None:
    assert check_uuid(VOL, "volume_id") == VOL


@pytest.mark.parametrize(
    "info",
    [
        _info(name="volume-x", format="raw"),
        json.loads(_info(name="volume-x", format="raw")),
        _info(name="volume-x", format="raw").encode(),
    ],
)
def test_bdm_state_reads_name_and_format_from_text_or_mapping(info: object) -> None:
    assert bdm_state(info, INST, VOL) == {"name": "volume-x", "format": "raw"}


@pytest.mark.parametrize(
    ("info", "says"),
    [
        (None, "has no connection_info"),
        ("null", "has no connection_info"),
        ("", "unreadable connection_info"),
        ("{not json", "unreadable connection_info"),
        (json.dumps({"driver_volume_type": "rbd"}), "names no file and format"),
        (_info(format="qcow2"), "names no file and format"),
        (_info(name="volume-x"), "names no file and format"),
        (_info(name="", format="raw"), "names no file and format"),
        (json.dumps(["data"]), "names no file and format"),
    ],
)
def test_bdm_state_refuses_a_bdm_naming_no_file(info: object, says: str) -> None:
    with pytest.raises(RefreshRefused, match=says) as exc:
        bdm_state(info, INST, VOL)
    assert f"volume {VOL} of instance {INST}" in str(exc.value)


def test_terminal_states_are_exactly_those_that_never_change() -> None:
    assert {s.value for s in nova_agent.TERMINAL} == {"succeeded", "failed", "cancelled"}
