"""Agent RPC API 1.0 over a real RabbitMQ: server in its own process, typed errors back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from testbed.service import Service
from testbed.stub_agent import INSTANCE, VOL_BUSY, VOL_CRASH, VOL_OK, start_stub_agent

pytestmark = pytest.mark.functional
HOST = "stub-host-1"
SNAP = "55555555-5555-4555-8555-555555555555"
NEW_FILE = f"volume-{VOL_OK}.{SNAP}"
CTXT = {"request_id": "req-abc", "user_id": "u", "project_id": "p"}


@pytest.fixture(scope="module")
def rabbit(rabbitmq: Any) -> Any:
    """The session's private RabbitMQ node (tests/conftest.py)."""
    return rabbitmq


@pytest.fixture(scope="module")
def agent_proc(rabbit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logdir = tmp_path_factory.mktemp("rpc")
    svc = start_stub_agent(logdir, rabbit.transport_url, HOST, timeout=60)
    yield svc
    assert svc.stop(30) == 0, svc.tail()


@pytest.fixture(scope="module")
def client(rabbit: Any, agent_proc: Any) -> Iterator[AgentAPI]:
    conf = make_conf()
    transport = get_transport(conf, rabbit.transport_url)
    yield AgentAPI(transport, HOST, timeout=30)
    transport.cleanup()


def _create_info(**extra: object) -> dict[str, object]:
    return {"snapshot_id": SNAP, "type": "qcow2", "new_file": NEW_FILE, **extra}


def test_create_returns_operation_and_get_list_find_it(client: AgentAPI) -> None:
    op = client.create_assisted_snapshot(CTXT, VOL_OK, _create_info(id="x"))
    assert op.kind is api.OperationKind.CREATE_ASSISTED
    assert op.state is api.OperationState.QUEUED
    assert (op.host, op.volume_ids, op.snapshot_id) == (HOST, (VOL_OK,), SNAP)
    assert op.result == {"request_id": "req-abc"}  # the RPC context reached the service
    assert client.get_operation(CTXT, op.id) == op
    listed = client.list_operations(CTXT, api.OperationFilters(volume_id=VOL_OK))
    assert op in listed
    none = client.list_operations(
        CTXT, api.OperationFilters(kind=api.OperationKind.DELETE_ASSISTED)
    )
    assert op not in none


def test_delete_both_kinds_and_instance_snapshot(client: AgentAPI) -> None:
    pull = client.delete_assisted_snapshot(
        CTXT,
        VOL_OK,
        SNAP,
        {"volume_id": VOL_OK, "type": "qcow2", "file_to_merge": None, "merge_target_file": None},
    )
    commit = client.delete_assisted_snapshot(
        CTXT,
        VOL_OK,
        SNAP,
        {"type": "qcow2", "file_to_merge": NEW_FILE, "merge_target_file": f"volume-{VOL_OK}"},
    )
    assert pull.kind is commit.kind is api.OperationKind.DELETE_ASSISTED
    assert pull.id != commit.id
    inst = client.snapshot_instance(CTXT, INSTANCE, None, api.Quiesce.REQUIRED)
    assert inst.kind is api.OperationKind.INSTANCE_SNAPSHOT
    assert inst.instance_uuid == INSTANCE and inst.volume_ids == (VOL_OK,)


def test_inventory(client: AgentAPI) -> None:
    inv = client.get_inventory(CTXT)
    assert inv.host == HOST
    assert [(v.volume_id, v.target) for v in inv.volumes] == [(VOL_OK, "vdb")]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda c: c.create_assisted_snapshot(CTXT, str(uuid.uuid4()), _create_info()),
            api.VolumeNotFound,
        ),
        (lambda c: c.create_assisted_snapshot(CTXT, VOL_BUSY, _create_info()), api.DiskBusy),
        (
            lambda c: c.create_assisted_snapshot(CTXT, VOL_CRASH, _create_info()),
            api.AgentInternalError,
        ),
        (
            lambda c: c.create_assisted_snapshot(CTXT, "not-a-uuid", _create_info()),
            api.InvalidRequest,
        ),
        (
            lambda c: c.create_assisted_snapshot(
                CTXT, VOL_OK, _create_info(new_file="../" + NEW_FILE)
            ),
            api.InvalidRequest,
        ),
        (
            lambda c: c.create_assisted_snapshot(CTXT, VOL_OK, _create_info(extra=1)),
            api.InvalidRequest,
        ),
        (
            lambda c: c.delete_assisted_snapshot(
                CTXT,
                VOL_OK,
                SNAP,
                {"type": "qcow2", "file_to_merge": "/etc/passwd", "merge_target_file": None},
            ),
            api.InvalidRequest,
        ),
        (lambda c: c.snapshot_instance(CTXT, str(uuid.uuid4()), None, True), api.InstanceNotFound),
        (lambda c: c.snapshot_instance(CTXT, INSTANCE, [VOL_BUSY], False), api.DiskBusy),
        (lambda c: c.get_operation(CTXT, "nope"), api.OperationNotFound),
    ],
    ids=[
        "unknown-volume",
        "busy",
        "internal",
        "bad-uuid",
        "path-new-file",
        "extra-field",
        "abs-file-to-merge",
        "unknown-instance",
        "busy-instance",
        "unknown-op",
    ],
)
def test_typed_errors(client: AgentAPI, call: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        call(client)
    assert type(info.value).__name__.startswith(error.__name__)


def test_typed_errors_without_allowed_exmods(rabbit: Any, agent_proc: Any) -> None:
    """A transport that does not allow our module still yields typed errors (RemoteError map)."""
    from hostagent.rpc.messaging import messaging

    om = messaging()
    transport = om.get_rpc_transport(make_conf(), url=rabbit.transport_url)
    try:
        with pytest.raises(api.VolumeNotFound):
            AgentAPI(transport, HOST, timeout=30).create_assisted_snapshot(
                CTXT, str(uuid.uuid4()), _create_info()
            )
    finally:
        transport.cleanup()


def test_inventory_fanout_reaches_every_listener(rabbit: Any) -> None:
    """Two API-side listeners on the fanout topic both get the agent's inventory_update."""
    import threading

    from hostagent.rpc.client import INVENTORY_TOPIC, InventoryFanout
    from hostagent.rpc.messaging import messaging

    om = messaging()
    transport = om.get_rpc_transport(make_conf(), url=rabbit.transport_url)
    got: list[tuple[str, dict[str, Any]]] = []
    cond = threading.Condition()

    class Listener:
        target = om.Target(version="1.0")

        def __init__(self, name: str) -> None:
            self.name = name

        def inventory_update(
            self, ctxt: Any, host: str, volumes: list[Any], generation: int
        ) -> None:
            with cond:
                got.append((self.name, {"host": host, "volumes": volumes, "gen": generation}))
                cond.notify_all()

    servers = [
        om.get_rpc_server(
            transport,
            om.Target(topic=INVENTORY_TOPIC, server=f"api-{n}"),
            [Listener(f"api-{n}")],
            executor="threading",
        )
        for n in (1, 2)
    ]
    for s in servers:
        s.start()
    try:
        inv = api.Inventory(HOST, (api.VolumeAttachment(VOL_OK, INSTANCE, "d", "vdb", "/s/f"),), 7)
        InventoryFanout(transport)(inv)
        deadline = time.monotonic() + 30
        with cond:
            while len(got) < 2 and time.monotonic() < deadline:
                cond.wait(1.0)
        assert sorted(name for name, _ in got) == ["api-1", "api-2"]
        for _, body in got:
            assert body["host"] == HOST and body["gen"] == 7
            assert api.Inventory.from_wire({"host": HOST, "volumes": body["volumes"]}).volumes == (
                inv.volumes
            )
    finally:
        for s in servers:
            s.stop()
            s.wait()
        transport.cleanup()
