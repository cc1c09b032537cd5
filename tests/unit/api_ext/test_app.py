"""The API app over plain WSGI (webtest) with a fake agent: validation, auth, error mapping."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import pytest
import webtest

from api_ext import auth
from api_ext.app import ApiApp
from api_ext.config import make_conf
from api_ext.router import Router
from hostagent.rpc import contract as api
from hostagent.rpc.client import om
from tests.unit.api_ext.fakes import wrapped_app

VOL = "11111111-1111-4111-8111-111111111111"
SNAP = "55555555-5555-4555-8555-555555555555"
INST = "44444444-4444-4444-8444-444444444444"
NEW_FILE = f"volume-{VOL}.{SNAP}"
SERVICE = {"X-Auth-Token": "cinder:svcproject", "X-Roles": "service"}
ADMIN = {"X-Auth-Token": "admin:adminproject", "X-Roles": "admin"}
MEMBER = {"X-Auth-Token": "alice:proj", "X-Roles": "member,reader"}
URL = "/v2.1/os-assisted-volume-snapshots"


class FakeAgent:
    def __init__(self, host: str) -> None:
        self.host = host
        self.calls: list[tuple[str, Any]] = []
        self.raise_: BaseException | None = None

    def _op(self, name: str, args: Any, kind: api.OperationKind) -> api.Operation:
        self.calls.append((name, args))
        if self.raise_ is not None:
            raise self.raise_
        return api.Operation("op1", kind, api.OperationState.QUEUED, self.host, (VOL,))

    def create_assisted_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, create_info: Mapping[str, Any]
    ) -> api.Operation:
        args = (dict(ctxt), volume_id, dict(create_info))
        return self._op("create", args, api.OperationKind.CREATE_ASSISTED)

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
    ) -> api.Operation:
        args = (volume_id, snapshot_id, dict(delete_info))
        return self._op("delete", args, api.OperationKind.DELETE_ASSISTED)

    def snapshot_instance(
        self,
        ctxt: Mapping[str, Any],
        instance_uuid: str,
        volume_ids: Sequence[str] | None,
        quiesce: api.Quiesce | bool = api.Quiesce.PREFERRED,
    ) -> api.Operation:
        args = (instance_uuid, volume_ids, quiesce)
        return self._op("instance", args, api.OperationKind.INSTANCE_SNAPSHOT)

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation:
        return self._op("get", op_id, api.OperationKind.CREATE_ASSISTED)


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent("host-a")


@pytest.fixture
def app(agent: FakeAgent, tmp_path: Any) -> webtest.TestApp:
    def agents(host: str) -> FakeAgent:
        assert host == "host-a"
        return agent

    routes = {"host-a": (VOL, INST)}
    return webtest.TestApp(wrapped_app(agents, tmp_path, routes, max_body=4096, generation=3))


def _create_body(**info: object) -> dict[str, Any]:
    create_info = {"snapshot_id": SNAP, "type": "qcow2", "new_file": NEW_FILE, **info}
    return {"snapshot": {"volume_id": VOL, "create_info": create_info}}


def _delete_url(snap: str = SNAP, **info: object) -> str:
    delete_info = {
        "volume_id": VOL,
        "type": "qcow2",
        "file_to_merge": NEW_FILE,
        "merge_target_file": f"volume-{VOL}",
        **info,
    }
    return f"{URL}/{snap}?delete_info=" + quote(json.dumps(delete_info))


def test_create_answers_like_nova(app: webtest.TestApp, agent: FakeAgent) -> None:
    resp = app.post_json(URL, _create_body(id="ignored"), headers=SERVICE)
    assert resp.status_int == 200
    assert resp.json == {"snapshot": {"id": SNAP, "volumeId": VOL}}
    assert resp.headers["OpenStack-API-Version"] == "compute 2.1"
    assert resp.headers["X-OpenStack-Nova-API-Version"] == "2.1"
    [(name, (ctxt, vol, info))] = agent.calls
    assert (name, vol) == ("create", VOL)
    assert info == {"snapshot_id": SNAP, "type": "qcow2", "new_file": NEW_FILE}
    assert (ctxt["user_id"], ctxt["project_id"], ctxt["roles"]) == (
        "cinder",
        "svcproject",
        ["service"],
    )


def test_delete_commit_and_pull(app: webtest.TestApp, agent: FakeAgent) -> None:
    assert app.delete(_delete_url(), headers=SERVICE).status_int == 204
    pull = _delete_url(file_to_merge=None, merge_target_file=None)
    assert app.delete(pull, headers=ADMIN).status_int == 204
    assert [c[1] for c in agent.calls] == [
        (
            VOL,
            SNAP,
            {
                "volume_id": VOL,
                "type": "qcow2",
                "file_to_merge": NEW_FILE,
                "merge_target_file": f"volume-{VOL}",
            },
        ),
        (
            VOL,
            SNAP,
            {"volume_id": VOL, "type": "qcow2", "file_to_merge": None, "merge_target_file": None},
        ),
    ]


BAD_CREATES: list[tuple[str, object, str]] = [
    ("malformed-json", b'{"snapshot": ', "Malformed"),
    ("empty", b"", "empty"),
    ("not-object", b"[]", "body"),
    ("no-snapshot", {"volume_id": VOL}, "snapshot"),
    ("unknown-top", {**_create_body(), "x": 1}, "x"),
    ("unknown-snapshot-field", {"snapshot": {**_create_body()["snapshot"], "x": 1}}, "x"),
    ("unknown-create-info-field", _create_body(extra="1"), "extra"),
    (
        "missing-new-file",
        {"snapshot": {"volume_id": VOL, "create_info": {"snapshot_id": SNAP, "type": "qcow2"}}},
        "new_file",
    ),
    ("type-raw", _create_body(type="raw"), "create_info/type"),
    ("new-file-slash", _create_body(new_file="/etc/" + NEW_FILE), "new_file"),
    ("new-file-dotdot", _create_body(new_file="../" + NEW_FILE), "new_file"),
    ("new-file-dots-only", _create_body(new_file=".."), "new_file"),
    ("new-file-foreign-name", _create_body(new_file="passwd"), "new_file"),
    (
        "bad-volume-uuid",
        {
            "snapshot": {
                "volume_id": "vol1",
                "create_info": _create_body()["snapshot"]["create_info"],
            }
        },
        "volume_id",
    ),
    ("bad-snapshot-uuid", _create_body(snapshot_id="snap-1"), "snapshot_id"),
    (
        "volume-id-number",
        {"snapshot": {"volume_id": 5, "create_info": _create_body()["snapshot"]["create_info"]}},
        "volume_id",
    ),
]


@pytest.mark.parametrize(
    ("body", "needle"), [b[1:] for b in BAD_CREATES], ids=[b[0] for b in BAD_CREATES]
)
def test_bad_create_is_400_naming_the_field(
    app: webtest.TestApp, agent: FakeAgent, body: object, needle: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = app.post(
        URL, raw, headers={**SERVICE, "Content-Type": "application/json"}, expect_errors=True
    )
    assert resp.status_int == 400, resp.text
    message = resp.json["badRequest"]["message"]
    assert needle in message
    assert agent.calls == []


BAD_DELETES: list[tuple[str, str]] = [
    ("no-delete-info", f"{URL}/{SNAP}"),
    ("delete-info-not-json", f"{URL}/{SNAP}?delete_info=%7Bnope"),
    ("unknown-field", _delete_url(extra=1)),
    (
        "missing-field",
        f"{URL}/{SNAP}?delete_info=" + quote(json.dumps({"volume_id": VOL, "type": "qcow2"})),
    ),
    ("abs-file-to-merge", _delete_url(file_to_merge="/etc/passwd")),
    ("dotdot-target", _delete_url(merge_target_file="../volume-" + VOL)),
    ("bad-snapshot-id", _delete_url(snap="not-a-uuid")),
    ("bad-volume-id", _delete_url(volume_id="v")),
    ("target-without-merge", _delete_url(file_to_merge=None)),
    ("twice", _delete_url() + "&delete_info=%7B%7D"),
]


@pytest.mark.parametrize("url", [b[1] for b in BAD_DELETES], ids=[b[0] for b in BAD_DELETES])
def test_bad_delete_is_400(app: webtest.TestApp, agent: FakeAgent, url: str) -> None:
    resp = app.delete(url, headers=SERVICE, expect_errors=True)
    assert resp.status_int == 400, resp.text
    assert resp.json["badRequest"]["message"]
    assert agent.calls == []


def test_oversized_body_is_413(app: webtest.TestApp, agent: FakeAgent) -> None:
    body = _create_body()
    body["snapshot"]["pad"] = "x" * 5000
    resp = app.post_json(URL, body, headers=SERVICE, expect_errors=True)
    assert resp.status_int == 413
    assert agent.calls == []


def test_oversized_body_without_length_is_413(app: webtest.TestApp, agent: FakeAgent) -> None:
    raw = json.dumps({**_create_body(), "pad": "y" * 5000}).encode()
    resp = app.post(
        URL,
        raw,
        headers={**SERVICE, "Content-Type": "application/json"},
        extra_environ={"CONTENT_LENGTH": "", "wsgi.input_terminated": True},
        expect_errors=True,
    )
    assert resp.status_int == 413
    assert agent.calls == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"X-Roles": "admin"}, 401), (MEMBER, 403), ({"X-Auth-Token": "u:p"}, 403)],
    ids=["no-token", "roles-without-token", "member", "no-roles"],
)
def test_auth_and_policy(
    app: webtest.TestApp, agent: FakeAgent, headers: dict[str, str], status: int
) -> None:
    for resp in (
        app.post_json(URL, _create_body(), headers=headers, expect_errors=True),
        app.delete(_delete_url(), headers=headers, expect_errors=True),
    ):
        assert resp.status_int == status
    assert agent.calls == []


def test_identity_headers_cannot_be_forged(app: webtest.TestApp, agent: FakeAgent) -> None:
    forged = {"X-Identity-Status": "Confirmed", "X-User-Id": "x", "X-Roles": "service"}
    resp = app.post_json(URL, _create_body(), headers=forged, expect_errors=True)
    assert resp.status_int == 401
    assert agent.calls == []


def test_instance_snapshot_is_admin_only(app: webtest.TestApp, agent: FakeAgent) -> None:
    url = f"/v1/instances/{INST}/snapshots"
    body = {"snapshot": {"volume_ids": [VOL], "quiesce": "required"}}
    assert app.post_json(url, body, headers=SERVICE, expect_errors=True).status_int == 403
    assert agent.calls == []
    resp = app.post_json(url, body, headers=ADMIN)
    assert resp.status_int == 202 and resp.json["operation"]["id"] == "op1"
    assert agent.calls == [("instance", (INST, (VOL,), api.Quiesce.REQUIRED))]


def test_instance_snapshot_unknown_instance_is_404(app: webtest.TestApp, agent: FakeAgent) -> None:
    url = f"/v1/instances/{uuid.uuid4()}/snapshots"
    resp = app.post_json(url, {"snapshot": {}}, headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert agent.calls == []


def test_get_operation(app: webtest.TestApp, agent: FakeAgent) -> None:
    resp = app.get("/v1/operations/op1", headers=ADMIN)
    assert resp.json["operation"]["state"] == "queued"
    agent.raise_ = api.OperationNotFound("no")
    assert app.get("/v1/operations/op2", headers=ADMIN, expect_errors=True).status_int == 404


def test_unknown_volume_is_404_without_agent_call(app: webtest.TestApp, agent: FakeAgent) -> None:
    body = _create_body()
    body["snapshot"]["volume_id"] = str(uuid.uuid4())
    resp = app.post_json(URL, body, headers=SERVICE, expect_errors=True)
    assert resp.status_int == 404 and "itemNotFound" in resp.json
    assert agent.calls == []


@pytest.mark.parametrize(
    ("error", "status", "fault"),
    [
        (api.VolumeNotFound("gone"), 404, "itemNotFound"),
        (api.DiskBusy("block job"), 409, "conflictingRequest"),
        (api.InvalidRequest("not in chain"), 400, "badRequest"),
        (api.AgentInternalError("boom"), 500, "computeFault"),
        (om.MessagingTimeout("slow"), 503, "serviceUnavailable"),
        (om.MessageDeliveryFailure("down"), 503, "serviceUnavailable"),
    ],
)
def test_agent_errors_map_to_status(
    app: webtest.TestApp, agent: FakeAgent, error: Exception, status: int, fault: str
) -> None:
    agent.raise_ = error
    resp = app.post_json(URL, _create_body(), headers=SERVICE, expect_errors=True)
    assert resp.status_int == status
    assert resp.json[fault]["code"] == status
    assert resp.headers["X-OpenStack-Nova-API-Version"] == "2.1"
    resp = app.delete(_delete_url(), headers=SERVICE, expect_errors=True)
    assert resp.status_int == status


def test_unknown_path_and_method(app: webtest.TestApp) -> None:
    assert app.get("/v2.1/servers", headers=SERVICE, expect_errors=True).status_int == 404
    assert app.put(URL, headers=SERVICE, expect_errors=True).status_int == 405
    assert app.get("/").json["versions"][0]["id"] == "v2.1"


def test_router_drops_stale_generation_but_accepts_restart() -> None:
    router = Router()
    other = "66666666-6666-4666-8666-666666666666"
    assert router.update("h", [{"volume_id": VOL, "instance_uuid": INST}], 5)
    assert not router.update("h", [], 4)
    assert router.host_for_volume(VOL) == "h"
    assert router.update("h", [{"volume_id": other, "instance_uuid": INST}], 1)  # restarted
    assert router.host_for_volume(other) == "h"


def test_router_probes_static_hosts_once_per_miss() -> None:
    probed: list[str] = []

    def probe(host: str) -> api.Inventory:
        probed.append(host)
        if host == "down":
            raise om.MessagingTimeout("x")
        att = api.VolumeAttachment(VOL, INST, "d", "vdb", "/s/f")
        return api.Inventory(host, (att,), 1)

    router = Router(["down", "up"], probe=probe, background=False)
    assert router.host_for_volume(VOL) == "up"
    assert router.host_for_volume(VOL) == "up"
    assert probed == ["down", "up"]
    # a publication dropping VOL is believed only once "up" answers without it: its own
    # answer (generation 1: VOL and not `other`) wins over the published generation 2
    other = "66666666-6666-4666-8666-666666666666"
    assert router.update("up", [{"volume_id": other, "instance_uuid": INST}], 2)
    assert router.host_for_volume(other) == "up"
    assert router.host_for_volume(VOL) == "up"
    router.verify_pending()
    assert router.host_for_volume(VOL) == "up"
    with pytest.raises(LookupError):
        router.host_for_volume(other)
    with pytest.raises(LookupError):
        router.host_for_volume(str(uuid.uuid4()))


def test_keystone_strategy_rejects_missing_token_before_the_app(
    agent: FakeAgent, tmp_path: Any
) -> None:
    """With auth_strategy=keystone, auth_token answers 401 itself (no Keystone needed)."""
    conf = make_conf(overrides={"api.policy_file": str(tmp_path / "none.yaml")})
    router = Router()
    router.update("host-a", [{"volume_id": VOL, "instance_uuid": INST}], 1)
    inner = ApiApp(router, lambda host: agent, auth.make_enforcer(conf))
    from keystonemiddleware.opts import list_auth_token_opts

    for group, opts in list_auth_token_opts():
        conf.register_opts(opts, group=group)
    keystone = "http://keystone.invalid/v3"
    conf.set_override("www_authenticate_uri", keystone, group="keystone_authtoken")
    app = webtest.TestApp(auth.wrap(inner, conf))
    forged = {"X-Identity-Status": "Confirmed", "X-User-Id": "x", "X-Roles": "service"}
    resp = app.post_json(URL, _create_body(), headers=forged, expect_errors=True)
    assert resp.status_int == 401
    assert resp.headers["WWW-Authenticate"] == f'Keystone uri="{keystone}"'
    assert agent.calls == []
