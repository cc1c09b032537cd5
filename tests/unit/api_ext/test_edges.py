"""Issue 14 edges in the API: deep/huge JSON is a 400, internal errors are an id only,
noauth only on loopback unless explicitly (and unsafely) allowed."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote

import pytest
import webtest

from api_ext import auth, schemas
from api_ext.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import om
from hostagent.rpc.wire_errors import INTERNAL_MESSAGE, internal_error
from tests.unit.api_ext.fakes import ADMIN, BK1, INST, SERVICE, SNAP, VOL, FakeAgent, wrapped_app

NEW_FILE = f"volume-{VOL}.{SNAP}"
NOVA = "/v2.1/os-assisted-volume-snapshots"
LEAKED_PATH = "/srv/qsnap-private/share-a/volume-x.secret"


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent("host-a")


@pytest.fixture
def app(agent: FakeAgent, tmp_path: Any) -> webtest.TestApp:
    return webtest.TestApp(wrapped_app(lambda h: agent, tmp_path, {"host-a": (VOL, INST)}))


def _deep(n: int) -> str:
    return "[" * n + "]" * n


PH = "@VALUE@"  # where a template takes its JSON value


def _create(value: str = json.dumps(NEW_FILE)) -> str:
    info = f'{{"snapshot_id": "{SNAP}", "type": "qcow2", "new_file": {value}}}'
    return f'{{"snapshot": {{"volume_id": "{VOL}", "create_info": {info}}}}}'


def _levels(obj: object) -> int:
    if isinstance(obj, dict):
        return 1 + max(map(_levels, obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max(map(_levels, obj), default=0)
    return 0


# (method, url, headers, body template: PH where a JSON value goes)
_BODY_ROUTES = [
    ("POST", NOVA, SERVICE, _create(PH)),
    ("POST", f"/v1/instances/{INST}/snapshots", ADMIN, '{"snapshot": {"volume_ids": @VALUE@}}'),
    ("POST", "/v1/backups", ADMIN, '{"backup": {"volume_ids": @VALUE@}}'),
    ("POST", f"/v1/backups/{BK1}/restore", ADMIN, '{"restore": {"to_path": @VALUE@}}'),
    ("POST", "/v1/backups/prune", ADMIN, '{"prune": {"keep_last": @VALUE@}}'),
]
_IDS = ["nova-create", "instance-snapshot", "backup-create", "backup-restore", "backup-prune"]


def _send(app: webtest.TestApp, method: str, url: str, headers: dict[str, str], body: str) -> Any:
    hdrs = {**headers, "Content-Type": "application/json"}
    return app.request(url, method=method, headers=hdrs, body=body.encode(), expect_errors=True)


def _bad_request(resp: Any) -> str:
    assert resp.status_int == 400, resp.body
    fault = resp.json["badRequest"]
    assert fault["code"] == 400
    return str(fault["message"])


@pytest.mark.parametrize(("method", "url", "headers", "template"), _BODY_ROUTES, ids=_IDS)
@pytest.mark.parametrize("depth", [17, 5000, 30000])
def test_deep_json_body_is_400_on_every_route(
    app: webtest.TestApp,
    agent: FakeAgent,
    method: str,
    url: str,
    headers: dict[str, str],
    template: str,
    depth: int,
) -> None:
    body = template.replace(PH, _deep(depth)) if depth < 30000 else _deep(depth)  # top level
    message = _bad_request(_send(app, method, url, headers, body))
    assert f"nested deeper than {schemas.MAX_JSON_DEPTH} levels" in message
    assert agent.calls == []


@pytest.mark.parametrize(("method", "url", "headers", "template"), _BODY_ROUTES, ids=_IDS)
def test_control_depth_at_the_limit_reaches_schema_validation(
    app: webtest.TestApp, method: str, url: str, headers: dict[str, str], template: str
) -> None:
    """Negative control: nesting up to the limit is decoded; the schema refuses the value."""
    outer = _levels(json.loads(template.replace(PH, "0")))  # levels the template adds
    body = template.replace(PH, _deep(schemas.MAX_JSON_DEPTH - outer))
    schemas.check_json_depth(body)  # within the bound
    message = _bad_request(_send(app, method, url, headers, body))
    assert "nested deeper" not in message and "Invalid input" in message


def test_brackets_inside_strings_do_not_count(app: webtest.TestApp, agent: FakeAgent) -> None:
    escaped = json.dumps('\\"' + "[" * 500 + '\\\\"{' * 300)
    schemas.check_json_depth(_create(escaped))
    resp = _send(app, "POST", NOVA, SERVICE, _create(escaped))
    assert "nested deeper" not in _bad_request(resp)  # refused by the file-name rule instead
    ok = _send(app, "POST", NOVA, SERVICE, _create())
    assert ok.status_int == 200 and len(agent.calls) == 1


def _delete_url(info: str) -> str:
    return f"{NOVA}/{SNAP}?delete_info={quote(info)}"


def _delete_info(**over: object) -> dict[str, object]:
    return {
        "volume_id": VOL,
        "type": "qcow2",
        "file_to_merge": NEW_FILE,
        "merge_target_file": None,
        **over,
    }


@pytest.mark.parametrize("depth", [17, 1500])
def test_deep_delete_info_is_400(app: webtest.TestApp, agent: FakeAgent, depth: int) -> None:
    info = json.dumps(_delete_info(type="X")).replace('"X"', _deep(depth))
    resp = app.delete(_delete_url(info), headers=SERVICE, expect_errors=True)
    message = _bad_request(resp)
    assert "nested deeper" in message or "longer than" in message
    assert agent.calls == []


def test_huge_delete_info_is_400_and_control_passes(app: webtest.TestApp, agent: FakeAgent) -> None:
    huge = json.dumps(_delete_info(pad="x" * schemas.MAX_DELETE_INFO))
    message = _bad_request(app.delete(_delete_url(huge), headers=SERVICE, expect_errors=True))
    assert f"longer than {schemas.MAX_DELETE_INFO}" in message
    assert agent.calls == []
    resp = app.delete(_delete_url(json.dumps(_delete_info())), headers=SERVICE)
    assert resp.status_int == 204 and len(agent.calls) == 1


def test_huge_number_is_400(app: webtest.TestApp) -> None:
    body = '{"prune": {"keep_last": ' + "9" * 20000 + "}}"
    assert "Malformed request body" in _bad_request(
        _send(app, "POST", "/v1/backups/prune", ADMIN, body)
    )


def test_parse_json_edges() -> None:
    assert schemas.parse_json(b'\xef\xbb\xbf{"a": [1]}') == {"a": [1]}  # BOM as json.loads
    at_limit = _deep(schemas.MAX_JSON_DEPTH)
    assert schemas.parse_json(at_limit) == json.loads(at_limit)
    for bad in (b"\xff\xfe\x00", b"{", _deep(schemas.MAX_JSON_DEPTH + 1)):
        with pytest.raises(schemas.BadRequest):
            schemas.parse_json(bad)


# -- internal errors: an id, never the text ------------------------------------------------
_ID = re.compile(r"error id ([0-9a-f]{32})")


def _internal(resp: Any) -> str:
    assert resp.status_int == 500
    fault = resp.json["computeFault"]
    assert fault["code"] == 500 and LEAKED_PATH not in resp.text and "Error" not in fault["message"]
    found = _ID.search(fault["message"])
    assert found is not None and fault["error_id"] == found.group(1)
    return found.group(1)


@pytest.mark.parametrize(
    "error",
    [
        api.AgentInternalError(
            f"OSError: [Errno 13] Permission denied: '{LEAKED_PATH}'"
        ),  # old agent
        om.RemoteError("KeyError", f"KeyError: '{LEAKED_PATH}'", "Traceback ..."),
        PermissionError(13, "Permission denied", LEAKED_PATH),  # a bug in the API itself
    ],
    ids=["raw-agent-text", "untyped-remote", "api-bug"],
)
def test_internal_errors_answer_an_id_and_log_the_details(
    app: webtest.TestApp, agent: FakeAgent, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    agent.raise_ = error
    caplog.set_level(logging.ERROR, logger="api_ext.app")
    instance = '{"snapshot": {"quiesce": "none"}}'
    for resp in (
        _send(app, "POST", NOVA, SERVICE, _create()),
        app.delete(_delete_url(json.dumps(_delete_info())), headers=SERVICE, expect_errors=True),
        _send(app, "POST", f"/v1/instances/{INST}/snapshots", ADMIN, instance),
    ):
        error_id = _internal(resp)
        logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
        assert logged and LEAKED_PATH in logged[0]


def test_agent_generic_answer_keeps_the_agents_id(
    app: webtest.TestApp, agent: FakeAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.raise_ = internal_error("0123456789abcdef0123456789abcdef")
    caplog.set_level(logging.ERROR, logger="api_ext.app")
    resp = _send(app, "POST", NOVA, SERVICE, _create())
    assert _internal(resp) == "0123456789abcdef0123456789abcdef"
    assert resp.json["computeFault"]["message"] == INTERNAL_MESSAGE.format(
        error_id="0123456789abcdef0123456789abcdef"
    )
    assert any("0123456789abcdef0123456789abcdef" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("error", "status", "fault"),
    [
        (api.VolumeNotFound(f"no volume at {LEAKED_PATH}"), 404, "itemNotFound"),
        (api.InvalidRequest(f"{LEAKED_PATH}: unsafe image"), 400, "badRequest"),
        (om.RemoteError("DiskBusy", "block job", ""), 409, "conflictingRequest"),
    ],
)
def test_control_typed_errors_keep_their_message(
    app: webtest.TestApp, agent: FakeAgent, error: Exception, status: int, fault: str
) -> None:
    """Negative control: expected errors are answered as before (no id, their own text)."""
    agent.raise_ = error
    resp = _send(app, "POST", NOVA, SERVICE, _create())
    assert resp.status_int == status and "error_id" not in resp.json[fault]
    assert resp.json[fault]["message"] in (str(error), getattr(error, "value", None))


# -- noauth: loopback only unless explicitly allowed ---------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def _conf(tmp_path: Any, **api_opts: object) -> Any:
    overrides = {f"api.{k}": v for k, v in api_opts.items()}
    return make_conf(overrides={"api.policy_file": str(tmp_path / "none.yaml"), **overrides})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])  # noqa: S104
def test_noauth_refused_on_non_loopback(tmp_path: Any, host: str) -> None:
    conf = _conf(tmp_path, auth_strategy="noauth", bind_host=host)
    with pytest.raises(auth.UnsafeConfiguration, match="noauth_unsafe_allow_non_loopback"):
        auth.wrap(lambda e, s: [], conf)


def test_noauth_opt_in_starts_with_a_warning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="api_ext.auth")
    conf = _conf(
        tmp_path,
        auth_strategy="noauth",
        bind_host="0.0.0.0",  # noqa: S104
        noauth_unsafe_allow_non_loopback=True,
    )
    assert isinstance(auth.wrap(lambda e, s: [], conf), auth.NoAuthMiddleware)
    assert any("UNSAFE" in r.getMessage() and "X-Roles" in r.getMessage() for r in caplog.records)


def test_control_noauth_on_loopback_and_keystone_anywhere(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="api_ext.auth")
    conf = _conf(tmp_path, auth_strategy="noauth", bind_host="127.0.0.1")
    assert isinstance(auth.wrap(lambda e, s: [], conf), auth.NoAuthMiddleware)
    assert any("noauth" in r.getMessage() for r in caplog.records)  # warned even here
    auth.check_noauth(_conf(tmp_path, auth_strategy="keystone", bind_host="0.0.0.0"))  # noqa: S104
    assert make_conf().api.noauth_unsafe_allow_non_loopback is False


def test_noauth_still_trusts_x_roles_on_loopback(app: webtest.TestApp, agent: FakeAgent) -> None:
    """The documented behaviour stands where noauth may run: X-Roles names the roles."""
    member = {"X-Auth-Token": "alice:proj", "X-Roles": "member"}
    assert _send(app, "POST", NOVA, member, _create()).status_int == 403
    assert _send(app, "POST", NOVA, SERVICE, _create()).status_int == 200
