"""``/v1/backups`` over WSGI with fake agents on two hosts: validation, routing (create by
the volume's host; the rest on the first answering host or a pinned one), error mapping,
policy and body limits."""

from __future__ import annotations

from typing import Any

import pytest
import webtest

from api_ext import auth
from api_ext.app import ApiApp
from api_ext.config import make_conf
from api_ext.router import Router
from hostagent.rpc import contract as api
from hostagent.rpc.client import om
from tests.unit.api_ext.fakes import (
    ADMIN,
    BK1,
    BK2,
    BK3,
    INST,
    SERVICE,
    VOL,
    VOL2,
    BackupNotFound,
    FakeAgent,
    backup,
    wrapped_app,
)
from tests.unit.api_ext.fakes import op as make_op

OTHER_INST = "77777777-7777-4777-8777-777777777777"


@pytest.fixture
def agents() -> dict[str, FakeAgent]:
    a, b = FakeAgent("host-a"), FakeAgent("host-b")
    for agent in (a, b):  # one shared repository: both agents see the same backups
        agent.backups = [
            backup(BK1, VOL, "2025-01-02T00:00:00+00:00"),
            backup(BK2, VOL2, "2025-01-01T00:00:00+00:00", incremental=True, parent=BK3),
        ]
    return {"host-a": a, "host-b": b}


@pytest.fixture
def app(agents: dict[str, FakeAgent], tmp_path: Any) -> webtest.TestApp:
    routes = {"host-a": (VOL, INST), "host-b": (VOL2, OTHER_INST)}
    return webtest.TestApp(wrapped_app(agents.__getitem__, tmp_path, routes, max_body=1024))


def _calls(agents: dict[str, FakeAgent]) -> list[tuple[str, str, Any]]:
    return [(h, name, args) for h, a in agents.items() for name, args in a.calls]


# -- create -------------------------------------------------------------------------------
def test_create_routes_to_the_volume_host(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    body = {"backup": {"volume_ids": [VOL2.upper()], "incremental": True}}
    resp = app.post_json("/v1/backups", body, headers=ADMIN)
    assert resp.status_int == 202
    assert resp.json["operation"]["host"] == "host-b"
    assert _calls(agents) == [("host-b", "create_backup", ([VOL2], None, True))]


def test_create_by_instance(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    resp = app.post_json("/v1/backups", {"backup": {"instance_uuid": INST}}, headers=ADMIN)
    assert resp.status_int == 202
    assert _calls(agents) == [("host-a", "create_backup", (None, INST, False))]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"backup": {}}, "exactly one of backup/volume_ids, backup/instance_uuid"),
        ({"backup": {"volume_ids": [VOL], "instance_uuid": INST}}, "exactly one"),
        ({"backup": {"volume_ids": []}}, "backup/volume_ids"),
        ({"backup": {"volume_ids": ["vol1"]}}, "backup/volume_ids: must be a UUID"),
        ({"backup": {"volume_ids": [VOL, VOL.upper()]}}, "duplicates"),
        ({"backup": {"instance_uuid": "x/../y"}}, "backup/instance_uuid"),
        ({"backup": {"volume_ids": [VOL], "incremental": "yes"}}, "backup/incremental"),
        ({"backup": {"volume_ids": [VOL], "quiesce": "off"}}, "quiesce"),
        ({"backups": {}}, "backup"),
        ([], "body"),
    ],
)
def test_create_bad_body_is_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent], body: object, needle: str
) -> None:
    resp = app.post_json("/v1/backups", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400
    assert needle in resp.json["badRequest"]["message"]
    assert _calls(agents) == []


def test_create_volumes_on_two_hosts_is_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    body = {"backup": {"volume_ids": [VOL, VOL2]}}
    resp = app.post_json("/v1/backups", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400
    message = resp.json["badRequest"]["message"]
    assert f"{VOL} on host-a" in message and f"{VOL2} on host-b" in message
    assert _calls(agents) == []


def test_create_unknown_volume_is_404(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = {"backup": {"volume_ids": [BK1]}}
    resp = app.post_json("/v1/backups", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert "is not attached on any known host" in resp.json["itemNotFound"]["message"]


def test_create_malformed_and_oversized_bodies(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    resp = app.post("/v1/backups", "{nope", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400 and "Malformed" in resp.json["badRequest"]["message"]
    big = {"backup": {"volume_ids": [VOL] * 200}}
    resp = app.post_json("/v1/backups", big, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 413
    assert _calls(agents) == []


# -- list / get ---------------------------------------------------------------------------
def test_list_asks_one_host_only(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = app.get("/v1/backups", headers=ADMIN).json
    assert [b["id"] for b in body["backups"]] == [BK1, BK2]
    assert _calls(agents) == [("host-a", "list_backups", None)]
    body = app.get(f"/v1/backups?volume_id={VOL2.upper()}&host=host-b", headers=ADMIN).json
    assert [b["id"] for b in body["backups"]] == [BK2]
    assert _calls(agents)[-1] == ("host-b", "list_backups", VOL2)


def test_list_skips_a_silent_host(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    agents["host-a"].raise_ = om.MessagingTimeout("slow")
    body = app.get("/v1/backups", headers=ADMIN).json
    assert len(body["backups"]) == 2
    assert [c[:2] for c in _calls(agents)] == [
        ("host-a", "list_backups"),
        ("host-b", "list_backups"),
    ]
    agents["host-b"].raise_ = om.MessagingTimeout("slow too")
    resp = app.get("/v1/backups", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 503


def test_reads_bound_each_host_and_changes_keep_the_full_timeout(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    """A silent host costs [api] host_timeout on a list/get (was the 30 s RPC timeout);
    a verify or delete is not cut short (a timed-out one may still run on that host)."""
    agents["host-a"].raise_ = om.MessagingTimeout("slow")
    app.get("/v1/backups", headers=ADMIN)
    app.get(f"/v1/backups/{BK1}", headers=ADMIN)
    assert agents["host-a"].bounds == [5.0, 5.0] and agents["host-b"].bounds == [5.0, 5.0]
    agents["host-a"].raise_ = None
    app.post(f"/v1/backups/{BK1}/verify", headers=ADMIN, expect_errors=True)
    app.delete(f"/v1/backups/{BK1}", headers=ADMIN, expect_errors=True)
    assert agents["host-a"].bounds == [5.0, 5.0]  # no bound on calls that change something
    assert [name for name, _ in agents["host-a"].calls][-2:] == ["verify_backup", "delete_backup"]


def test_an_answering_agent_error_is_not_retried_elsewhere(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    agents["host-a"].raise_ = om.RemoteError("KeyError", "boom", "")
    resp = app.get("/v1/backups", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 500
    assert agents["host-b"].calls == []


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("volume_id=v1", "volume_id"),
        ("host=", "host"),
        ("host=nope", "unknown host 'nope'"),
        ("sort=asc", "sort"),
        ("volume_id=a&volume_id=b", "volume_id"),
    ],
)
def test_list_bad_query(
    app: webtest.TestApp, agents: dict[str, FakeAgent], query: str, needle: str
) -> None:
    resp = app.get("/v1/backups?" + query, headers=ADMIN, expect_errors=True)
    assert resp.status_int in (400, 404)
    assert needle in next(iter(resp.json.values()))["message"]
    assert _calls(agents) == []


def test_get(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = app.get(f"/v1/backups/{BK2}", headers=ADMIN).json
    assert body["backup"]["parent"] == BK3 and body["backup"]["source_chain"] == ["volume-x"]
    resp = app.get(f"/v1/backups/{BK3}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert resp.json["itemNotFound"]["message"] == f"no backup {BK3}"
    resp = app.get("/v1/backups/not-a-uuid", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400 and "backup_id" in resp.json["badRequest"]["message"]


# -- verify / delete ----------------------------------------------------------------------
def test_verify_and_pinned_host(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    resp = app.post(f"/v1/backups/{BK1}/verify?host=host-b", headers=ADMIN)
    assert resp.status_int == 202 and resp.json["operation"]["host"] == "host-b"
    assert _calls(agents) == [("host-b", "verify_backup", BK1)]
    resp = app.post(f"/v1/backups/{BK1}/verify", "{}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400 and "takes no request body" in resp.text


def test_delete(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    resp = app.delete(f"/v1/backups/{BK1.upper()}", headers=ADMIN)
    assert resp.status_int == 204 and resp.body == b""
    assert _calls(agents) == [("host-a", "delete_backup", BK1)]
    resp = app.delete(f"/v1/backups/{BK1}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404


@pytest.mark.parametrize(
    ("error", "status", "fault"),
    [
        (BackupNotFound("no backup x"), 404, "itemNotFound"),
        (om.RemoteError("BackupNotFound", "no backup y", ""), 404, "itemNotFound"),
        (api.DiskBusy("a backup of the volume runs"), 409, "conflictingRequest"),
        (api.InvalidRequest("restore target exists"), 400, "badRequest"),
        (om.RemoteError("InvalidRequest", "bad path", ""), 400, "badRequest"),
        (api.AgentInternalError("disk full"), 500, "computeFault"),
    ],
)
def test_error_mapping(
    app: webtest.TestApp,
    agents: dict[str, FakeAgent],
    error: Exception,
    status: int,
    fault: str,
) -> None:
    agents["host-a"].raise_ = error
    resp = app.delete(f"/v1/backups/{BK1}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == status
    message = resp.json[fault]["message"]
    if status == 500:  # an internal error is answered by an id only (issue 14)
        assert "disk full" not in message and resp.json[fault]["error_id"] in message
    else:
        assert message == (error.value if isinstance(error, om.RemoteError) else str(error))
    assert agents["host-b"].calls == []


# -- restore ------------------------------------------------------------------------------
def test_restore_to_path_and_to_volume(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = {"restore": {"to_path": "/srv/share/restored.qcow2"}}
    resp = app.post_json(f"/v1/backups/{BK1}/restore", body, headers=ADMIN)
    assert resp.status_int == 202 and resp.json["operation"]["host"] == "host-a"
    body2 = {"restore": {"volume_id": VOL2.upper(), "format": "raw"}, "host": "host-b"}
    resp = app.post_json(f"/v1/backups/{BK1}/restore", body2, headers=ADMIN)
    assert resp.json["operation"]["host"] == "host-b"
    assert _calls(agents) == [
        ("host-a", "restore_backup", (BK1, "/srv/share/restored.qcow2", None, "qcow2")),
        ("host-b", "restore_backup", (BK1, None, VOL2, "raw")),
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"restore": {}}, "exactly one of restore/to_path, restore/volume_id"),
        ({"restore": {"to_path": "/a", "volume_id": VOL}}, "exactly one"),
        ({"restore": {"to_path": "relative/x"}}, "restore/to_path: an absolute path"),
        ({"restore": {"to_path": "/srv/../etc/x"}}, "must be normalised"),
        ({"restore": {"to_path": "/srv//x"}}, "must be normalised"),
        ({"restore": {"to_path": "/srv/x/"}}, "must be normalised"),
        ({"restore": {"to_path": "/srv/x\x00y"}}, "restore/to_path"),
        ({"restore": {"to_path": "/" + "a" * 1100}}, "restore/to_path"),
        ({"restore": {"volume_id": "v"}}, "restore/volume_id: must be a UUID"),
        ({"restore": {"volume_id": VOL, "format": "vmdk"}}, "restore/format"),
        ({"restore": {"volume_id": VOL}, "host": 3}, "host"),
        ({"restore": {"volume_id": VOL}, "extra": 1}, "extra"),
    ],
)
def test_restore_bad_body_is_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent], body: object, needle: str
) -> None:
    resp = app.post_json(f"/v1/backups/{BK1}/restore", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int in (400, 413)
    if resp.status_int == 400:
        assert needle in resp.json["badRequest"]["message"]
    assert _calls(agents) == []


def test_restore_on_unknown_host_is_404(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = {"restore": {"volume_id": VOL}, "host": "host-z"}
    resp = app.post_json(f"/v1/backups/{BK1}/restore", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404 and "host-z" in resp.json["itemNotFound"]["message"]


# -- prune --------------------------------------------------------------------------------
def test_prune(app: webtest.TestApp, agents: dict[str, FakeAgent]) -> None:
    body = {"prune": {"keep_last": 1, "dry_run": True}}
    resp = app.post_json("/v1/backups/prune", body, headers=ADMIN)
    assert resp.status_int == 202  # RPC 1.3: an operation (start_prune)
    op = resp.json["operation"]
    assert op["kind"] == "backup" and op["host"] == "host-a"
    assert {k: op["result"][k] for k in ("deleted", "kept", "chunks_removed", "bytes_freed")} == {
        "deleted": [BK2],
        "kept": [BK1],
        "chunks_removed": 0,
        "bytes_freed": 0,
    }
    body = {"prune": {"keep_daily": 7, "volume_id": VOL2}, "host": "host-b"}
    app.post_json("/v1/backups/prune", body, headers=ADMIN)
    app.post_json("/v1/backups/prune", {"prune": {}}, headers=ADMIN)  # the agent's default
    assert _calls(agents) == [
        ("host-a", "start_prune", (1, None, None, True)),
        ("host-a", "start_prune", (None, None, None, False)),
        ("host-b", "start_prune", (None, 7, VOL2, False)),
    ]


# -- cancel -------------------------------------------------------------------------------
def test_cancel_operation_routes_refuses_and_is_admin_only(
    app: webtest.TestApp, agents: dict[str, FakeAgent]
) -> None:
    b = agents["host-b"]
    b.ops += [
        make_op("run-1", "host-b", "running", kind=api.OperationKind.BACKUP),
        make_op("done-1", "host-b", "succeeded", kind=api.OperationKind.BACKUP),
        make_op("snap-1", "host-b", "running"),  # an instance snapshot
    ]
    resp = app.post("/v1/operations/run-1/cancel", headers=ADMIN)
    assert resp.status_int == 202 and resp.json["operation"]["id"] == "run-1"
    # asked host by host like GET: host-a does not know it, host-b cancels it
    assert [(h, n) for h, n, _ in _calls(agents)] == [("host-a", "cancel"), ("host-b", "cancel")]
    shown = app.get("/v1/operations/run-1", headers=ADMIN).json["operation"]
    assert shown["state"] == "cancelled"
    resp = app.post("/v1/operations/done-1/cancel?host=host-b", headers=ADMIN, status=409)
    assert "already ended: succeeded" in resp.json["conflictingRequest"]["message"]
    resp = app.post("/v1/operations/snap-1/cancel", headers=ADMIN, status=409)
    assert "not cancellable" in resp.json["conflictingRequest"]["message"]
    app.post("/v1/operations/nope/cancel", headers=ADMIN, status=404)
    app.post("/v1/operations/run-1/cancel?host=host-z", headers=ADMIN, status=404)
    app.post("/v1/operations/a..b/cancel", headers=ADMIN, status=400)
    app.post("/v1/operations/run-1/cancel", "{}", headers=ADMIN, status=400)  # no body
    before = len(b.calls)
    app.post("/v1/operations/run-1/cancel", headers=SERVICE, status=403)
    app.get("/v1/operations/run-1/cancel", headers=ADMIN, status=405)
    assert len(b.calls) == before  # refused before any agent was asked


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prune": {"keep_last": 0, "keep_daily": 0}}, "prune must keep something"),
        ({"prune": {"keep_daily": 0}}, "prune must keep something"),
        ({"prune": {"keep_last": -1}}, "prune/keep_last"),
        ({"prune": {"keep_last": "3"}}, "prune/keep_last"),
        ({"prune": {"keep_last": 1, "volume_id": "v"}}, "prune/volume_id"),
        ({"prune": {"keep_last": 1, "dry_run": "no"}}, "prune/dry_run"),
        ({"prune": {"keep_last": 1, "all": True}}, "all"),
    ],
)
def test_prune_bad_body_is_400(
    app: webtest.TestApp, agents: dict[str, FakeAgent], body: object, needle: str
) -> None:
    resp = app.post_json("/v1/backups/prune", body, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 400
    assert needle in resp.json["badRequest"]["message"]
    assert _calls(agents) == []


# -- policy, methods ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "/v1/backups"),
        ("GET", "/v1/backups"),
        ("GET", f"/v1/backups/{BK1}"),
        ("POST", f"/v1/backups/{BK1}/verify"),
        ("DELETE", f"/v1/backups/{BK1}"),
        ("POST", f"/v1/backups/{BK1}/restore"),
        ("POST", "/v1/backups/prune"),
    ],
)
def test_every_backup_call_is_admin_only(
    app: webtest.TestApp, agents: dict[str, FakeAgent], method: str, url: str
) -> None:
    resp = app.request(url, method=method, headers=SERVICE, expect_errors=True)
    assert resp.status_int == 403
    assert "Policy does not allow backup_" in resp.json["forbidden"]["message"]
    assert _calls(agents) == []


def test_wrong_method_is_405(app: webtest.TestApp) -> None:
    resp = app.put(f"/v1/backups/{BK1}", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 405


def test_no_known_host_is_503(tmp_path: Any) -> None:
    conf = make_conf(
        overrides={"api.auth_strategy": "noauth", "api.policy_file": str(tmp_path / "none.yaml")}
    )
    inner = ApiApp(Router(), lambda h: FakeAgent(h), auth.make_enforcer(conf))
    resp = webtest.TestApp(auth.wrap(inner, conf)).get(
        "/v1/backups", headers=ADMIN, expect_errors=True
    )
    assert resp.status_int == 503
