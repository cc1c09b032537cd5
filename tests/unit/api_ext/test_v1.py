"""The native /v1 API over WSGI with fake agents on two hosts: listing fan-out, agent-owned
snapshot delete, policy and error mapping."""

from __future__ import annotations

from typing import Any

import pytest
import webtest

from hostagent.rpc import contract as api
from hostagent.rpc.client import om
from tests.unit.api_ext.fakes import (
    ADMIN,
    INST,
    SERVICE,
    SNAP,
    VOL,
    VOL2,
    FakeAgent,
    op,
    wrapped_app,
)

DELETE_URL = f"/v1/volumes/{VOL}/snapshots/{SNAP}"


class SnapshotNotFound(api.AgentRpcError):
    """Stands in for RPC 1.1's api.SnapshotNotFound (mapped by name)."""


@pytest.fixture
def agents() -> dict[str, FakeAgent]:
    return {"host-a": FakeAgent("host-a"), "host-b": FakeAgent("host-b")}


@pytest.fixture
def app(agents: dict[str, FakeAgent], tmp_path: Any) -> webtest.TestApp:
    routes = {"host-a": (VOL, INST), "host-b": (VOL2, INST)}
    return webtest.TestApp(wrapped_app(agents.__getitem__, tmp_path, routes))


def _seed(agents: dict[str, FakeAgent]) -> None:
    a, b = agents["host-a"], agents["host-b"]
    a.ops = [
        op("a1", "host-a", "succeeded", created="2025-01-01T10:00:00+00:00"),
        op("a2", "host-a", "running", created="2025-01-01T12:00:00+00:00", progress=(1, 4)),
    ]
    b.ops = [
        op("b1", "host-b", "failed", created="2025-01-01T11:00:00+00:00", volumes=(VOL2,)),
        op("b2", "host-b", "succeeded", created="2025-01-01T13:00:00+00:00", volumes=(VOL2,)),
    ]


def test_list_merges_hosts_newest_first_and_limits_after_merge(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    _seed(agents)
    body = app.get("/v1/operations", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["b2", "a2", "b1", "a1"]
    assert body["operations"][1]["result"]["progress"] == {"cur": 1, "end": 4}
    assert "failed_hosts" not in body
    top2 = app.get("/v1/operations?limit=2", headers=ADMIN).json["operations"]
    assert [o["id"] for o in top2] == ["b2", "a2"]
    # each agent was asked for the caller's 2 (RPC 1.4: its newest 2), not the maximum
    assert agents["host-a"].calls[-1][1].limit == 2


def test_list_filters_reach_the_agents(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    _seed(agents)
    url = f"/v1/operations?state=succeeded&kind=snapshot_instance&volume_id={VOL2}"
    body = app.get(url, headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["b2"]
    _, filters = agents["host-a"].calls[-1]
    assert (filters.state, filters.kind, filters.volume_id) == (
        api.OperationState.SUCCEEDED,
        api.OperationKind.INSTANCE_SNAPSHOT,
        VOL2,
    )


def test_list_one_host(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    _seed(agents)
    body = app.get("/v1/operations?host=host-a", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["a2", "a1"]
    assert agents["host-b"].calls == []
    resp = app.get("/v1/operations?host=nope", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404 and "nope" in resp.json["itemNotFound"]["message"]


def test_list_reports_a_silent_host_instead_of_failing(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    _seed(agents)
    agents["host-b"].raise_ = om.MessagingTimeout("slow")
    body = app.get("/v1/operations", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["a2", "a1"]
    assert body["failed_hosts"] == {"host-b": "no answer in time"}
    # asked by name, the same host's silence is the answer: 503
    resp = app.get("/v1/operations?host=host-b", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 503


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("state=done", "state"),
        ("kind=frobnicate", "kind"),
        ("volume_id=v1", "volume_id"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("sort=asc", "sort"),
        ("state=failed&state=running", "state"),
        ("host=", "host"),
    ],
)
def test_list_bad_query_is_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent], query: str, needle: str
) -> None:
    resp = app.get("/v1/operations?" + query, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400
    assert needle in resp.json["badRequest"]["message"]
    assert agents["host-a"].calls == [] and agents["host-b"].calls == []


def test_delete_snapshot_routes_by_volume(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    resp = app.delete(f"/v1/volumes/{VOL2.upper()}/snapshots/{SNAP}", headers=ADMIN)
    assert resp.status_int == 202
    assert resp.json["operation"]["host"] == "host-b"
    assert agents["host-b"].calls == [("delete_snapshot", (VOL2, SNAP))]
    assert agents["host-a"].calls == []


@pytest.mark.parametrize(
    ("error", "status", "fault"),
    [
        (SnapshotNotFound("no snapshot x in the ledger"), 404, "itemNotFound"),
        (api.VolumeNotFound("detached"), 404, "itemNotFound"),
        (api.DiskBusy("block job"), 409, "conflictingRequest"),
        (api.InvalidRequest("bad chain"), 400, "badRequest"),
        (om.RemoteError("SnapshotNotFound", "unknown snapshot", ""), 404, "itemNotFound"),
        (om.RemoteError("KeyError", "x", ""), 500, "computeFault"),
    ],
)
def test_delete_snapshot_errors(
    app: webtest.TestApp,
    agents: dict[str, FakeAgent],
    error: Exception,
    status: int,
    fault: str,
) -> None:
    agents["host-a"].raise_ = error
    resp = app.delete(DELETE_URL, headers=ADMIN, expect_errors=True)
    assert resp.status_int == status
    message = resp.json[fault]["message"]
    if status != 500:
        assert message == (error.value if isinstance(error, om.RemoteError) else str(error))


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (f"/v1/volumes/v1/snapshots/{SNAP}", "volume_id"),
        (f"/v1/volumes/{VOL}/snapshots/s..", "snapshot_id"),
    ],
)
def test_delete_snapshot_bad_ids_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent], url: str, needle: str
) -> None:
    resp = app.delete(url, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400 and needle in resp.json["badRequest"]["message"]
    assert agents["host-a"].calls == []


def test_delete_snapshot_unknown_volume_404(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    resp = app.delete(f"/v1/volumes/{SNAP}/snapshots/{SNAP}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert agents["host-a"].calls == [] and agents["host-b"].calls == []


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/v1/operations"),
        ("GET", "/v1/operations/op1"),
        ("DELETE", DELETE_URL),
        ("POST", f"/v1/instances/{INST}/snapshots"),
    ],
)
def test_every_v1_call_is_admin_only(
    app: webtest.TestApp, agents: dict[str, FakeAgent], method: str, url: str
) -> None:
    kwargs: dict[str, Any] = {"headers": SERVICE, "expect_errors": True}
    if method == "POST":
        resp = app.post_json(url, {"snapshot": {}}, **kwargs)
    else:
        resp = app.request(url, method=method, **kwargs)
    assert resp.status_int == 403
    assert agents["host-a"].calls == [] and agents["host-b"].calls == []
