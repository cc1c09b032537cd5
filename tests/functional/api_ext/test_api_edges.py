"""Issue 14 edges through a running qsnap-api process -> RabbitMQ -> stub agent process.

- Deep or huge JSON on every JSON route answers 400 with a Nova fault body, and the same
  process goes on serving.
- An internal error in the agent whose text names a path reaches the caller as an error id
  and a generic message; the agent's log holds the id with the path and traceback, the API's
  log the id without the path.
- noauth refuses to start on a non-loopback bind_host unless explicitly (unsafely) allowed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from testbed.service import REPO, Service, start_api, write_conf
from testbed.stub_agent import INSTANCE, LEAK_PATH, VOL_LEAK, VOL_OK, start_stub_agent

pytestmark = pytest.mark.functional
HOST = "stub-host-edges"
SNAP = "55555555-5555-4555-8555-555555555555"
NEW_FILE = f"volume-{VOL_OK}.{SNAP}"
BK = "66666666-6666-4666-8666-666666666661"
SERVICE = {"X-Auth-Token": "cinder:svc", "X-Roles": "service"}
ADMIN = {"X-Auth-Token": "admin:adm", "X-Roles": "admin"}
NOVA = "/v2.1/os-assisted-volume-snapshots"
MAX_DEPTH = 16  # api_ext.schemas.MAX_JSON_DEPTH, as a caller sees it


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-edges")


@pytest.fixture(scope="module")
def agent(rabbitmq: Any, logdir: Path) -> Iterator[Service]:
    svc = start_stub_agent(logdir, rabbitmq.transport_url, HOST, timeout=60)
    yield svc
    assert svc.stop(30) == 0, svc.tail()


@pytest.fixture(scope="module")
def api(rabbitmq: Any, agent: Service, logdir: Path) -> Iterator[tuple[Service, str]]:
    opts = {"hosts": HOST, "rpc_timeout": 20}
    svc, url = start_api(logdir, rabbitmq.transport_url, opts, timeout=60)
    yield svc, url
    assert svc.stop(30) == 0, svc.tail()


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _create(value: str) -> str:
    info = f'{{"snapshot_id": "{SNAP}", "type": "qcow2", "new_file": {value}}}'
    return f'{{"snapshot": {{"volume_id": "{VOL_OK}", "create_info": {info}}}}}'


ROUTES = [
    (NOVA, SERVICE, _create("@V@")),
    (f"/v1/instances/{INSTANCE}/snapshots", ADMIN, '{"snapshot": {"volume_ids": @V@}}'),
    ("/v1/backups", ADMIN, '{"backup": {"volume_ids": @V@}}'),
    (f"/v1/backups/{BK}/restore", ADMIN, '{"restore": {"to_path": @V@}}'),
    ("/v1/backups/prune", ADMIN, '{"prune": {"keep_last": @V@}}'),
]


def _post(url: str, headers: dict[str, str], body: str) -> requests.Response:
    hdrs = {**headers, "Content-Type": "application/json"}
    return requests.post(url, data=body.encode(), headers=hdrs, timeout=60)


def _bad_request(resp: requests.Response) -> str:
    assert resp.status_code == 400, resp.text
    fault = resp.json()["badRequest"]
    assert fault["code"] == 400
    return str(fault["message"])


@pytest.mark.parametrize(
    ("path", "headers", "template"),
    ROUTES,
    ids=["nova-create", "instance-snapshot", "backup-create", "backup-restore", "backup-prune"],
)
def test_deep_json_is_400_on_every_route(
    api: tuple[Service, str], path: str, headers: dict[str, str], template: str
) -> None:
    svc, url = api
    for body in (template.replace("@V@", _deep(MAX_DEPTH)), _deep(20000)):
        message = _bad_request(_post(url + path, headers, body))
        assert f"nested deeper than {MAX_DEPTH} levels" in message
    assert "RecursionError" not in svc.tail(20000)


def test_deep_and_huge_delete_info_are_400(api: tuple[Service, str]) -> None:
    _, url = api
    info = {"volume_id": VOL_OK, "type": "qcow2", "file_to_merge": NEW_FILE}
    deep = json.dumps({**info, "merge_target_file": None}).replace("null", _deep(1500))
    huge = json.dumps({**info, "merge_target_file": None, "pad": "x" * 5000})
    for bad, needle in ((deep, "nested deeper"), (huge, "longer than 4096")):
        resp = requests.delete(
            f"{url}{NOVA}/{SNAP}?delete_info={quote(bad)}", headers=SERVICE, timeout=60
        )
        assert needle in _bad_request(resp)
        assert resp.headers["X-OpenStack-Nova-API-Version"] == "2.1"


def test_control_the_process_still_serves_good_requests(api: tuple[Service, str]) -> None:
    _, url = api
    body = _create(json.dumps(NEW_FILE))
    resp = _post(url + NOVA, SERVICE, body)
    assert resp.status_code == 200 and resp.json()["snapshot"]["id"] == SNAP
    at_limit = '{"snapshot": {"volume_ids": ' + _deep(MAX_DEPTH - 2) + "}}"
    message = _bad_request(_post(url + f"/v1/instances/{INSTANCE}/snapshots", ADMIN, at_limit))
    assert "nested deeper" not in message  # decoded, then refused by the schema


def _wait_for(svc: Service, needle: str, t: float = 30) -> str:
    deadline = time.monotonic() + t
    while needle not in (log := svc.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{needle!r} never logged: {svc.tail()}"
        time.sleep(0.2)
    return log


def test_internal_error_answers_an_id_and_the_agent_logs_the_path(
    api: tuple[Service, str], agent: Service
) -> None:
    svc, url = api
    body = json.dumps({"snapshot": {"volume_ids": [VOL_LEAK], "quiesce": "none"}})
    resp = _post(url + f"/v1/instances/{INSTANCE}/snapshots", ADMIN, body)
    assert resp.status_code == 500, resp.text
    fault = resp.json()["computeFault"]
    found = re.search(r"error id ([0-9a-f]{32})", fault["message"])
    assert found is not None and fault["error_id"] == found.group(1)
    error_id = found.group(1)
    assert LEAK_PATH not in resp.text and "PermissionError" not in resp.text
    # the agent's log: the id beside the exception text with its path, and the traceback
    agent_log = _wait_for(agent, error_id)
    line = next(ln for ln in agent_log.splitlines() if error_id in ln)
    assert LEAK_PATH in line and "PermissionError" in line
    assert "Traceback" in agent_log[agent_log.index(line) :]
    # the API's log names the id, and nothing of the path crossed the bus
    api_log = _wait_for(svc, error_id)
    assert LEAK_PATH not in api_log


def _api_argv(conf: Path) -> list[str]:
    return [sys.executable, "-m", "api_ext.server", "--config-file", str(conf), "--ready-line"]


def test_noauth_refuses_a_non_loopback_bind(rabbitmq: Any, logdir: Path) -> None:
    conf = write_conf(
        logdir / "noauth-public.conf",
        {
            "DEFAULT": {"transport_url": rabbitmq.transport_url},
            "api": {"bind_host": "0.0.0.0", "bind_port": 0, "auth_strategy": "noauth"},  # noqa: S104
        },
    )
    res = subprocess.run(
        _api_argv(conf), cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "READY" not in res.stdout
    assert "refusing to start" in res.stderr
    assert "noauth_unsafe_allow_non_loopback" in res.stderr


def test_noauth_explicit_unsafe_opt_in_starts_and_warns(rabbitmq: Any, logdir: Path) -> None:
    opts = {"bind_host": "0.0.0.0", "noauth_unsafe_allow_non_loopback": "true"}  # noqa: S104
    svc, url = start_api(logdir, rabbitmq.transport_url, opts, name="qsnap-api-optin", timeout=60)
    try:
        assert "UNSAFE: auth_strategy = noauth on non-loopback bind_host 0.0.0.0" in svc.tail(20000)
        resp = requests.get(url + "/", timeout=30)
        assert resp.status_code == 200
    finally:
        assert svc.stop(30) == 0, svc.tail()


def test_control_noauth_on_loopback_warns_and_serves(api: tuple[Service, str]) -> None:
    svc, url = api
    assert "auth_strategy = noauth: every local caller is trusted" in svc.tail(200000)
    member = {"X-Auth-Token": "alice:p", "X-Roles": "member"}
    assert _post(url + NOVA, member, _create(json.dumps(NEW_FILE))).status_code == 403
