"""``qsnap`` CLI end to end over real HTTP: keystoneauth1 session -> cheroot -> the real ApiApp
(noauth) -> fake agents. Covers every command, json output, exit codes and progress output."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from api_ext import _cli_output as output
from api_ext import cli
from hostagent.rpc import contract as api
from tests.unit.api_ext.cli_harness import Server, run
from tests.unit.api_ext.fakes import INST, SNAP, VOL, VOL2, FakeAgent, op

pytestmark = pytest.mark.usefixtures("clean_env")


class SnapshotNotFound(api.AgentRpcError):
    """Stands in for RPC 1.1's api.SnapshotNotFound (the API maps it by name)."""


@pytest.fixture
def agents(cli_agents: dict[str, FakeAgent]) -> dict[str, FakeAgent]:
    """Fresh fake agents per test, behind the module's one server."""
    cli_agents.clear()
    cli_agents.update({"host-a": FakeAgent("host-a"), "host-b": FakeAgent("host-b")})
    return cli_agents


def _seed(agents: dict[str, FakeAgent]) -> None:
    agents["host-a"].ops = [
        op("a1", "host-a", "succeeded", created="2025-01-01T10:00:00+00:00"),
        op("a2", "host-a", "running", created="2025-01-01T12:00:00+00:00", progress=(1, 4)),
    ]
    agents["host-b"].ops = [op("b1", "host-b", "failed", created="2025-01-01T11:00:00+00:00")]


def _script(agent: FakeAgent, *, fail: bool = False) -> None:
    """snapshot create's operation: queued -> plan -> snapshot 50% -> final."""
    agent.next_op = op("op9", agent.host)
    done = [("plan", "done"), ("snapshot", "done"), ("ledger", "done")]
    final = (
        op(
            "op9",
            agent.host,
            "failed",
            steps=[*done[:1], ("snapshot", "failed")],
            error={"code": "QuiesceFailed", "message": "guest agent did not freeze"},
        )
        if fail
        else op(
            "op9",
            agent.host,
            "succeeded",
            steps=done,
            progress=(2, 2),
            snapshots=[{"volume_id": VOL, "snapshot_id": SNAP, "file": "f"}],
            quiesced=True,
        )
    )
    agent.script["op9"] = [
        op("op9", agent.host, "running", steps=[("plan", "planned")]),
        op(
            "op9",
            agent.host,
            "running",
            steps=[("plan", "done"), ("snapshot", "planned")],
            progress=(1, 2),
        ),
        final,
    ]


# -- ops ----------------------------------------------------------------------------------
def test_ops_list_table_and_json(server: Server, agents: dict[str, FakeAgent]) -> None:
    _seed(agents)
    rc, out, err = run(server, "ops", "list")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATE", "HOST", "VOLUMES", "CREATED", "PROGRESS"]
    assert [line.split()[0] for line in lines[2:]] == ["a2", "b1", "a1"]
    assert "25%" in lines[2]
    rc, out, _ = run(server, "ops", "list", "--format", "json", "--limit", "2", "--host", "host-a")
    body = json.loads(out)
    assert [o["id"] for o in body["operations"]] == ["a2", "a1"]
    assert agents["host-b"].calls == [("list", agents["host-b"].calls[0][1])]  # only the first


def test_ops_list_filters_and_failed_host(server: Server, agents: dict[str, FakeAgent]) -> None:
    _seed(agents)
    agents["host-b"].raise_ = api.AgentInternalError("journal locked")
    rc, out, err = run(server, "ops", "list", "--state", "succeeded", "--volume", VOL)
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["a1"]
    assert "warning: host host-b not listed: AgentInternalError: journal locked" in err
    _, filters = agents["host-a"].calls[-1]
    assert (filters.state, filters.volume_id) == (api.OperationState.SUCCEEDED, VOL)


def test_ops_show(server: Server, agents: dict[str, FakeAgent]) -> None:
    _seed(agents)
    rc, out, _ = run(server, "ops", "show", "a2")
    assert rc == 0
    rows = dict(line.split(None, 1) for line in out.splitlines()[2:])
    assert rows["state"] == "running" and rows["host"] == "host-a"
    assert rows["progress"] == "1/4 (25%)"
    rc, out, _ = run(server, "ops", "show", "b1", "--host", "host-b", "-f", "json")
    assert json.loads(out) == {"operation": agents["host-b"].ops[0].to_wire()}
    assert agents["host-a"].calls == [("get", "a2")]


def test_ops_show_unknown_is_exit_1_with_the_api_message(server: Server) -> None:
    rc, out, err = run(server, "ops", "show", "nope")
    assert (rc, out) == (1, "")
    assert err == "qsnap: error: HTTP 404: operation nope not found\n"


# -- snapshot create ----------------------------------------------------------------------
def test_create_waits_with_plain_progress_lines(
    server: Server, agents: dict[str, FakeAgent]
) -> None:
    _script(agents["host-a"])
    rc, out, err = run(
        server, "snapshot", "create", "--instance", INST, "--volume", VOL,
        "--quiesce", "require", "--poll-interval", "0.01",
    )  # fmt: skip
    assert rc == 0, err
    assert agents["host-a"].calls[0] == ("instance", (INST, (VOL,), api.Quiesce.REQUIRED))
    assert err.splitlines() == [
        "operation op9: queued",
        "operation op9: running, step plan",
        "operation op9: running, step snapshot, 50%",
        "operation op9: succeeded, step ledger, 100%",
    ]
    rows = dict(line.split(None, 1) for line in out.splitlines()[2:])
    assert rows["state"] == "succeeded"
    assert rows["snapshot"] == f"{SNAP} of volume {VOL}"
    assert rows["result.quiesced"] == "true"


def test_create_on_a_tty_draws_one_bar(server: Server, agents: dict[str, FakeAgent]) -> None:
    _script(agents["host-a"])
    rc, out, err = run(
        server, "snapshot", "create", "--instance", INST, "--poll-interval", "0.01", "-f", "json",
        tty=True,
    )  # fmt: skip
    assert rc == 0
    frames = err.rstrip("\n").split("\r")[1:]
    assert frames[0].startswith("op9 [" + "-" * 30 + "]   ?% queued")
    assert frames[2].startswith("op9 [" + "#" * 15 + "-" * 15 + "]  50% running snapshot")
    assert frames[-1].startswith("op9 [" + "#" * 30 + "] 100% succeeded ledger")
    assert err.endswith("\n") and err.count("\n") == 1
    assert json.loads(out)["operation"]["state"] == "succeeded"  # stdout stays pure JSON
    assert agents["host-a"].calls[0] == ("instance", (INST, None, api.Quiesce.PREFERRED))


def test_create_operation_failure_is_exit_1(server: Server, agents: dict[str, FakeAgent]) -> None:
    _script(agents["host-a"], fail=True)
    rc, out, err = run(
        server, "snapshot", "create", "--instance", INST, "--quiesce", "off",
        "--poll-interval", "0.01",
    )  # fmt: skip
    assert rc == 1
    rows = dict(line.split(None, 1) for line in out.splitlines()[2:])
    assert rows["error"] == "QuiesceFailed: guest agent did not freeze"
    assert err.endswith("qsnap: operation op9 failed: guest agent did not freeze\n")
    assert agents["host-a"].calls[0][1][2] is api.Quiesce.NONE


def test_create_no_wait_prints_the_accepted_operation(
    server: Server, agents: dict[str, FakeAgent]
) -> None:
    rc, out, err = run(server, "snapshot", "create", "--instance", INST, "--no-wait", "-f", "json")
    assert (rc, err) == (0, "")
    assert json.loads(out)["operation"]["state"] == "queued"
    assert [c[0] for c in agents["host-a"].calls] == ["instance"]


def test_create_wait_timeout_is_exit_1(server: Server, agents: dict[str, FakeAgent]) -> None:
    agents["host-a"].next_op = op("op7", "host-a", "running")
    rc, _, err = run(
        server, "snapshot", "create", "--instance", INST,
        "--poll-interval", "0.01", "--wait-timeout", "0.05",
    )  # fmt: skip
    assert rc == 1
    assert "operation op7 still running after 0.05 s; follow it with: qsnap ops show op7" in err


def test_create_unknown_instance_is_404_message(server: Server) -> None:
    rc, _, err = run(server, "snapshot", "create", "--instance", SNAP)
    assert rc == 1
    assert err == f"qsnap: error: HTTP 404: instance {SNAP} is not attached on any known host\n"


# -- snapshot delete ----------------------------------------------------------------------
def test_delete_routes_to_the_volume_host(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, _ = run(server, "snapshot", "delete", "--volume", VOL2, SNAP, "-f", "json")
    assert rc == 0
    assert json.loads(out)["operation"]["host"] == "host-b"
    assert agents["host-b"].calls == [("delete_snapshot", (VOL2, SNAP))]


def test_delete_wait(server: Server, agents: dict[str, FakeAgent]) -> None:
    agents["host-a"].next_op = op("d1", "host-a")
    agents["host-a"].script["d1"] = [
        op("d1", "host-a", "running", steps=[("merge", "planned")], progress=(3, 4)),
        op("d1", "host-a", "succeeded", steps=[("merge", "done")], progress=(4, 4)),
    ]
    rc, _, err = run(
        server, "snapshot", "delete", "--volume", VOL, SNAP, "--wait", "--poll-interval", "0.01"
    )
    assert rc == 0
    assert "operation d1: running, step merge, 75%" in err.splitlines()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SnapshotNotFound(f"snapshot {SNAP} is not in the ledger"), "HTTP 404: snapshot"),
        (api.DiskBusy("a block job runs on vdb"), "HTTP 409: a block job runs on vdb"),
    ],
)
def test_delete_errors(
    server: Server, agents: dict[str, FakeAgent], error: Exception, expected: str
) -> None:
    agents["host-a"].raise_ = error
    rc, out, err = run(server, "snapshot", "delete", "--volume", VOL, SNAP)
    assert (rc, out) == (1, "")
    assert err.startswith("qsnap: error: " + expected)


def test_bad_uuid_is_the_api_400(server: Server) -> None:
    rc, _, err = run(server, "snapshot", "delete", "--volume", "vol1", SNAP)
    assert rc == 1
    assert "HTTP 400: Invalid input for field/attribute volume_id" in err


# -- auth, usage, connection --------------------------------------------------------------
def test_policy_refusal_message(agents: dict[str, FakeAgent], tmp_path: Any) -> None:
    srv = Server(agents, ["member"], tmp_path)
    try:
        rc, _, err = run(srv, "ops", "list")
    finally:
        srv.stop()
    assert rc == 1
    assert "HTTP 403: Policy does not allow list_operations to be performed." in err


def test_endpoint_from_qsnap_url(
    server: Server, agents: dict[str, FakeAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(agents)
    monkeypatch.setenv("QSNAP_URL", server.url)
    out = io.StringIO()
    assert cli.main(["--os-auth-type", "none", "ops", "list", "-f", "json"], stdout=out) == 0
    assert len(json.loads(out.getvalue())["operations"]) == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--os-auth-type", "none", "ops", "list"],  # no endpoint
        ["--os-endpoint", "http://127.0.0.1:9", "ops", "list"],  # password auth, no options
        ["--os-auth-type", "none", "--os-endpoint", "http://x", "snapshot", "create"],
        ["--os-auth-type", "none", "--os-endpoint", "http://x", "ops", "list", "--limit", "0"],
        ["--os-auth-type", "none", "--os-endpoint", "http://x", "ops", "list", "--state", "x"],
        ["--os-auth-type", "nosuchplugin", "ops", "list"],
        ["ops"],
    ],
    ids=["none-no-endpoint", "password-missing", "no-instance", "limit", "state", "plugin", "sub"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    assert cli.main(argv, stdout=io.StringIO(), stderr=err) == 2
    text = err.getvalue() + capsys.readouterr().err
    assert "error" in text


def test_password_auth_names_missing_options() -> None:
    err = io.StringIO()
    argv = ["--os-auth-url", "http://127.0.0.1:9/v3", "ops", "list"]
    assert cli.main(argv, stdout=io.StringIO(), stderr=err) == 2
    assert "authentication needs" in err.getvalue() and "--os-" in err.getvalue()


def test_connection_refused_is_exit_1(agents: dict[str, FakeAgent], tmp_path: Any) -> None:
    srv = Server(agents, ["admin"], tmp_path)
    srv.stop()
    rc, out, err = run(srv.url, "ops", "list")
    assert (rc, out) == (1, "")
    assert err.startswith("qsnap: error: cannot reach the qsnap API:")


# -- progress lines without a terminal ----------------------------------------------------
def test_plain_progress_is_throttled_but_never_silent() -> None:
    now = [0.0]
    stream = io.StringIO()
    rep = output.ProgressReporter(stream, min_gap=2.0, heartbeat=30.0, clock=lambda: now[0])

    def at(t: float, cur: int, step: str = "merge") -> None:
        now[0] = t
        running = op("x", "h", "running", steps=[(step, "planned")], progress=(cur, 100))
        rep.update(running.to_wire())

    at(0.0, 1)  # first: printed
    at(0.5, 2)  # moved, too soon: not printed
    at(2.5, 3)  # moved after min_gap: printed
    at(3.0, 3, "ledger")  # step changed: printed at once
    at(4.0, 3, "ledger")  # nothing changed: not printed
    at(40.0, 3, "ledger")  # heartbeat
    assert stream.getvalue().splitlines() == [
        "operation x: running, step merge, 1%",
        "operation x: running, step merge, 3%",
        "operation x: running, step ledger, 3%",
        "operation x: running, step ledger, 3%",
    ]
