"""``GET /v1/operations`` passes the caller's limit down to every agent (RPC 1.4: each answers
its newest ``limit`` matches), merges newest first and cuts to ``limit`` again."""

from __future__ import annotations

from typing import Any

import pytest
import webtest

from hostagent.rpc import contract as api
from tests.unit.api_ext.fakes import ADMIN, INST, VOL, VOL2, FakeAgent, op, wrapped_app

HOSTS = ("host-a", "host-b", "host-c")


@pytest.fixture
def agents() -> dict[str, FakeAgent]:
    out = {h: FakeAgent(h) for h in HOSTS}
    for n, host in enumerate(HOSTS):  # 20 operations per host, interleaved in time
        out[host].ops = [
            op(f"{host}-{i:02d}", host, "succeeded", created=_at(i * 3 + n)) for i in range(20)
        ]
    out["host-b"].ops.insert(0, op("b-running", "host-b", "running", created=_at(0)))
    return out


@pytest.fixture
def app(agents: dict[str, FakeAgent], tmp_path: Any) -> webtest.TestApp:
    routes = {"host-a": (VOL, INST), "host-b": (VOL2, INST), "host-c": (VOL2, INST)}
    return webtest.TestApp(wrapped_app(agents.__getitem__, tmp_path, routes))


def _at(minute: int) -> str:
    return f"2025-01-01T{minute // 60:02d}:{minute % 60:02d}:00+00:00"


def _limits(agents: dict[str, FakeAgent]) -> dict[str, int]:
    return {h: a.calls[-1][1].limit for h, a in agents.items() if a.calls}


def test_limit_one_asks_each_host_for_one(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    body = app.get("/v1/operations?limit=1", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["host-c-19"]  # the newest of all hosts
    assert _limits(agents) == dict.fromkeys(HOSTS, 1)


def test_merge_is_exact_with_the_limit_passed_down(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    every = sorted(
        (o for a in agents.values() for o in a.ops), key=lambda o: o.created_at or "", reverse=True
    )
    body = app.get("/v1/operations?limit=7", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == [o.id for o in every[:7]]
    assert _limits(agents) == dict.fromkeys(HOSTS, 7)
    default = app.get("/v1/operations", headers=ADMIN).json["operations"]
    assert len(default) == 61 and _limits(agents) == dict.fromkeys(HOSTS, 100)


def test_filters_and_limit_reach_the_named_host_only(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    body = app.get("/v1/operations?host=host-b&state=running&limit=1", headers=ADMIN).json
    assert [o["id"] for o in body["operations"]] == ["b-running"]  # oldest, yet listed
    assert _limits(agents) == {"host-b": 1}
    (_, filters) = agents["host-b"].calls[-1]
    assert filters == api.OperationFilters(state=api.OperationState.RUNNING, limit=1)
