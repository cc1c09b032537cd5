"""RPC 1.4 ``list_operations`` over oslo.messaging ``fake://``: the caller's limit reaches the
agent's journal and the newest come back first; a 1.3 agent (which answers the oldest, and
refuses a 1.4 call) is asked for its maximum and the newest of that are kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.journal.model import OperationKind, OperationState
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from hostagent.rpc.messaging import messaging
from hostagent.rpc.server import AgentEndpoint, get_server
from tests.unit.hostagent.fakes import Agent, Bed

om = messaging()
CTX = {"request_id": "req-list"}


@pytest.fixture
def transport() -> Iterator[Any]:
    t = get_transport(make_conf(overrides={"transport_url": "fake://", "host": "h"}))
    yield t
    t.cleanup()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Bed(tmp_path).agent()
    j = a.journal
    for i in range(12):
        op = j.begin(OperationKind.RESTORE, {"i": i}).operation
        j.finish(op.id, OperationState.SUCCEEDED)
    yield a
    a.close()


def _serve(transport: Any, endpoint: object) -> Any:
    server = om.get_rpc_server(
        transport,
        om.Target(topic=api.RPC_TOPIC, server="h"),
        [endpoint],
        executor="threading",
        access_policy=om.DefaultRPCAccessPolicy,
    )
    server.start()
    return server


def test_limit_reaches_the_agent_and_the_newest_come_first(transport: Any, agent: Agent) -> None:
    server = get_server(transport, "h", agent.svc)
    server.start()
    try:
        client = AgentAPI(transport, "h", timeout=30)
        every = client.list_operations(CTX)
        assert len(every) == 12
        stamps = [o.created_at or "" for o in every]
        assert stamps == sorted(stamps, reverse=True)
        assert client.list_operations(CTX, api.OperationFilters(limit=1)) == every[:1]
        assert client.list_operations(CTX, api.OperationFilters(limit=5)) == every[:5]
    finally:
        server.stop()
        server.wait()


class Endpoint13(AgentEndpoint):
    """What a 1.3 agent serves: its journal's OLDEST matches first, and no 1.4."""

    target = om.Target(version="1.3")

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.svc)
        self.agent = agent
        self.asked: list[object] = []

    def list_operations(self, ctxt: dict[str, Any], filters: object) -> list[dict[str, Any]]:
        self.asked.append(filters)
        f = api.OperationFilters.from_wire(filters)
        found = self.agent.journal.list_operations(limit=f.limit)  # oldest first, as 1.3 did
        return [api.Operation.of(op, ()).to_wire() for op in found]


def test_a_1_3_agent_is_asked_for_its_maximum_and_the_newest_are_kept(
    transport: Any, agent: Agent
) -> None:
    old = Endpoint13(agent)
    server = _serve(transport, old)
    try:
        client = AgentAPI(transport, "h", timeout=30)
        two = client.list_operations(CTX, api.OperationFilters(limit=2))
        newest = agent.journal.list_operations(newest_first=True, limit=2)
        assert [o.id for o in two] == [str(o.id) for o in newest]
        assert [f["limit"] for f in old.asked] == [1000]  # type: ignore[index]
        with pytest.raises(api.InvalidRequest):  # other errors are not swallowed
            client.list_operations(CTX, api.OperationFilters(volume_id="nope"))  # type: ignore[arg-type]
    finally:
        server.stop()
        server.wait()
