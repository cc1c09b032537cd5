"""``qsnap backup ...`` end to end over real HTTP (keystoneauth1 -> cheroot -> ApiApp -> fake
agents): every command, table and json output, --wait with progress, exit codes."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from api_ext import cli
from hostagent.rpc import contract as api
from tests.unit.api_ext.cli_harness import Server, run
from tests.unit.api_ext.fakes import (
    BK1,
    BK2,
    BK3,
    INST,
    VOL,
    VOL2,
    BackupNotFound,
    FakeAgent,
    backup,
    kind_of,
    op,
)

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def agents(cli_agents: dict[str, FakeAgent]) -> dict[str, FakeAgent]:
    cli_agents.clear()
    cli_agents.update({"host-a": FakeAgent("host-a"), "host-b": FakeAgent("host-b")})
    for agent in cli_agents.values():
        agent.backups = [
            backup(BK1, VOL, "2025-01-02T00:00:00+00:00"),
            backup(BK2, VOL, "2025-01-03T00:00:00+00:00", incremental=True, parent=BK1),
        ]
    return cli_agents


def _rows(out: str) -> dict[str, str]:
    return dict([*line.split(None, 1), ""][:2] for line in out.splitlines()[2:])


def _script_backup(agent: FakeAgent, op_id: str = "bk1", **final: Any) -> None:
    """A backup operation: queued -> read 40% -> succeeded with the contract's result."""
    kind = kind_of("BACKUP")
    agent.next_op = op(op_id, agent.host, kind=kind)
    agent.script[op_id] = [
        op(op_id, agent.host, "running", kind=kind, steps=[("read", "planned")], progress=(2, 5)),
        op(op_id, agent.host, "succeeded", kind=kind, steps=[("read", "done")], progress=(5, 5),
           **final),
    ]  # fmt: skip


# -- create -------------------------------------------------------------------------------
def test_create_wait_shows_progress_and_the_backups(
    server: Server, agents: dict[str, FakeAgent]
) -> None:
    result = {
        "backups": [
            {"volume_id": VOL, "backup_id": BK3, "incremental": True, "bytes_read": 41943040,
             "bytes_stored": 20971520, "fallback_reason": None},
        ]
    }  # fmt: skip
    _script_backup(agents["host-a"], **result)
    rc, out, err = run(
        server, "backup", "create", "--volume", VOL, "--incremental", "--wait",
        "--poll-interval", "0.01",
    )  # fmt: skip
    assert rc == 0, err
    assert agents["host-a"].calls[0] == ("create_backup", ([VOL], None, True))
    assert err.splitlines() == [
        "operation bk1: queued",
        "operation bk1: running, step read, 40%",
        "operation bk1: succeeded, step read, 100%",
    ]
    rows = _rows(out)
    assert rows["state"] == "succeeded"
    assert rows["backup"] == (
        f"{BK3} of volume {VOL} (incremental, read 40.0 MiB, stored 20.0 MiB)"
    )


def test_create_by_instance_no_wait_json(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, err = run(server, "backup", "create", "--instance", INST, "-f", "json")
    assert (rc, err) == (0, "")
    assert json.loads(out)["operation"]["state"] == "queued"
    assert agents["host-a"].calls == [("create_backup", (None, INST, False))]


def test_create_fallback_and_failure(server: Server, agents: dict[str, FakeAgent]) -> None:
    fallback = {"backups": [{"volume_id": VOL, "backup_id": BK3, "incremental": False,
                             "bytes_read": 1024, "bytes_stored": 0,
                             "fallback_reason": "checkpoint overlay merged away"}]}  # fmt: skip
    _script_backup(agents["host-a"], **fallback)
    rc, out, _ = run(server, "backup", "create", "--volume", VOL, "--wait", "--poll-interval",
                     "0.01")  # fmt: skip
    assert rc == 0
    assert _rows(out)["backup"].endswith(
        "(full, read 1.0 KiB, stored 0 B); full read because: checkpoint overlay merged away"
    )
    agents["host-a"].next_op = op("bk2", "host-a")
    agents["host-a"].script["bk2"] = [
        op("bk2", "host-a", "failed", error={"code": "RepositoryFull", "message": "no space"})
    ]
    rc, out, err = run(server, "backup", "create", "--volume", VOL, "--wait",
                       "--poll-interval", "0.01")  # fmt: skip
    assert rc == 1
    assert err.endswith("qsnap: operation bk2 failed: no space\n")


def test_create_volumes_on_two_hosts_is_the_api_400(server: Server) -> None:
    rc, out, err = run(server, "backup", "create", "--volume", VOL, "--volume", VOL2)
    assert (rc, out) == (1, "")
    assert err.startswith("qsnap: error: HTTP 400: Invalid input: the volumes are attached on")


# -- list / show --------------------------------------------------------------------------
def test_list_table_and_json(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, err = run(server, "backup", "list")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "VOLUME", "CREATED", "TYPE", "SIZE", "DATA", "PARENT"]
    assert lines[2].split() == [
        BK1, VOL, "2025-01-02T00:00:00+00:00", "full", "1.0", "GiB", "12.0", "MiB",
    ]  # fmt: skip
    assert lines[3].split()[3] == "incremental" and lines[3].split()[-1] == BK1
    rc, out, _ = run(server, "backup", "list", "--volume", VOL2, "--host", "host-b", "-f", "json")
    assert json.loads(out) == {"backups": []}
    assert agents["host-b"].calls == [("list_backups", VOL2)]


def test_show(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, _ = run(server, "backup", "show", BK2)
    assert rc == 0
    rows = _rows(out)
    assert rows["parent"] == BK1 and rows["incremental"] == "true"
    assert rows["source_chain"] == '["volume-x"]'
    rc, out, _ = run(server, "backup", "show", BK2, "-f", "json")
    assert json.loads(out)["backup"]["id"] == BK2
    rc, out, err = run(server, "backup", "show", BK3)
    assert (rc, out, err) == (1, "", f"qsnap: error: HTTP 404: no backup {BK3}\n")


# -- verify -------------------------------------------------------------------------------
def _script_verify(agent: FakeAgent, ok: bool) -> None:
    final = {"ok": ok, "bad_chunks": [] if ok else ["ab12cd", "ef34"]}
    agent.next_op = op("v1", agent.host)
    agent.script["v1"] = [op("v1", agent.host, "succeeded", progress=(3, 3), **final)]


def test_verify_ok_and_corrupt(server: Server, agents: dict[str, FakeAgent]) -> None:
    _script_verify(agents["host-a"], ok=True)
    rc, out, err = run(server, "backup", "verify", BK1, "--wait", "--poll-interval", "0.01")
    assert rc == 0, err
    assert _rows(out)["result.ok"] == "true"
    _script_verify(agents["host-a"], ok=False)
    rc, out, err = run(server, "backup", "verify", BK1, "--wait", "--poll-interval", "0.01")
    assert rc == 1
    assert err.endswith(f"qsnap: backup {BK1} is corrupt: bad chunks: ab12cd, ef34\n")
    rc, out, _ = run(server, "backup", "verify", BK1, "--host", "host-b", "-f", "json")
    assert rc == 0 and json.loads(out)["operation"]["state"] == "queued"  # not waited for
    assert agents["host-b"].calls == [("verify_backup", BK1)]


# -- delete -------------------------------------------------------------------------------
def test_delete(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, err = run(server, "backup", "delete", BK1)
    assert (rc, out, err) == (0, f"backup {BK1} deleted\n", "")
    rc, out, err = run(server, "backup", "delete", BK2, "-f", "json")
    assert (rc, out, err) == (0, "", "")
    rc, out, err = run(server, "backup", "delete", BK1)
    assert (rc, out) == (1, "")
    assert err == f"qsnap: error: HTTP 404: no backup {BK1}\n"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BackupNotFound("no backup z"), "HTTP 404: no backup z"),
        (api.DiskBusy("a backup of it runs"), "HTTP 409: a backup of it runs"),
        (api.InvalidRequest("bad id"), "HTTP 400: bad id"),
    ],
)
def test_delete_errors(
    server: Server, agents: dict[str, FakeAgent], error: Exception, expected: str
) -> None:
    agents["host-a"].raise_ = error
    rc, _, err = run(server, "backup", "delete", BK1)
    assert rc == 1 and err == f"qsnap: error: {expected}\n"


# -- restore ------------------------------------------------------------------------------
def test_restore_to_path_wait(server: Server, agents: dict[str, FakeAgent]) -> None:
    kind = kind_of("RESTORE")
    agents["host-a"].next_op = op("r1", "host-a", kind=kind)
    agents["host-a"].script["r1"] = [
        op("r1", "host-a", "running", kind=kind, progress=(1, 4)),
        op("r1", "host-a", "succeeded", kind=kind, progress=(4, 4), path="/srv/s/out.raw"),
    ]
    rc, out, err = run(
        server, "backup", "restore", BK1, "--to", "/srv/s/out.raw", "--disk-format", "raw",
        "--wait", "--poll-interval", "0.01",
    )  # fmt: skip
    assert rc == 0, err
    assert "operation r1: running, 25%" in err.splitlines()
    assert _rows(out)["result.path"] == '"/srv/s/out.raw"'
    assert agents["host-a"].calls[0] == ("restore_backup", (BK1, "/srv/s/out.raw", None, "raw"))


def test_restore_to_volume_on_a_host(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, _ = run(server, "backup", "restore", BK1, "--volume", VOL2, "--host", "host-b",
                     "-f", "json")  # fmt: skip
    assert rc == 0 and json.loads(out)["operation"]["host"] == "host-b"
    assert agents["host-b"].calls == [("restore_backup", (BK1, None, VOL2, "qcow2"))]


def test_restore_relative_path_is_the_api_400(server: Server) -> None:
    rc, _, err = run(server, "backup", "restore", BK1, "--to", "out.qcow2")
    assert rc == 1 and "HTTP 400: Invalid input for field/attribute restore/to_path" in err


# -- prune --------------------------------------------------------------------------------
def test_prune_is_followed_as_an_operation(server: Server, agents: dict[str, FakeAgent]) -> None:
    rc, out, err = run(server, "backup", "prune", "--keep-last", "1", "--dry-run")
    assert rc == 0 and "step prune, 100%" in err  # followed with progress by default
    rows = _rows(out)
    assert rows["state"] == "succeeded" and rows["kind"] == "backup"
    assert json.loads(rows["result.deleted"]) == [BK1]
    assert json.loads(rows["result.kept"]) == [BK2]
    assert len(agents["host-a"].backups) == 2
    rc, out, _ = run(server, "backup", "prune", "--keep-last", "1", "--keep-daily", "3",
                     "--volume", VOL, "-f", "json")  # fmt: skip
    assert json.loads(out)["operation"]["result"]["bytes_freed"] == 8388608
    assert ("start_prune", (1, 3, VOL, False)) in agents["host-a"].calls
    rc, _, err = run(server, "backup", "prune", "--keep-last", "0")
    assert rc == 1 and "prune must keep something" in err
    before = len(agents["host-a"].calls)
    rc, out, err = run(server, "backup", "prune", "--no-wait")  # the agent's default retention
    assert (rc, err) == (0, "") and _rows(out)["id"].startswith("prune-")
    assert agents["host-a"].calls[before:] == [("start_prune", (None, None, None, False))]


def test_ops_cancel(server: Server, agents: dict[str, FakeAgent]) -> None:
    a = agents["host-a"]
    a.ops += [
        op("run-1", "host-a", "running", kind=kind_of("BACKUP")),
        op("snap-1", "host-a", "running"),
    ]
    a.script["run-1"] = [a.ops[-2]]  # shown running until the cancel
    rc, out, err = run(server, "ops", "cancel", "run-1")
    assert (rc, err) == (0, "") and _rows(out)["state"] == "running"  # accepted
    rc, _, err = run(server, "ops", "cancel", "run-1")  # it ended (cancelled): refused
    assert rc == 1 and "HTTP 409" in err and "already ended: cancelled" in err
    a.ops.append(op("run-2", "host-a", "running", kind=kind_of("BACKUP")))
    rc, out, err = run(server, "ops", "cancel", "run-2", "--wait", "-f", "json")
    assert rc == 0 and json.loads(out)["operation"]["state"] == "cancelled"
    rc, _, err = run(server, "ops", "cancel", "snap-1")
    assert rc == 1 and "HTTP 409" in err and "not cancellable" in err
    rc, _, err = run(server, "ops", "cancel", "nope")
    assert rc == 1 and "HTTP 404" in err


def test_waiting_create_ended_cancelled_exits_1(
    server: Server, agents: dict[str, FakeAgent]
) -> None:
    a = agents["host-a"]
    a.next_op = op("bk-c", "host-a", kind=kind_of("BACKUP"))
    err_info = {"code": "OperationCancelled", "message": "cancelled on request; stay published"}
    a.script["bk-c"] = [op("bk-c", "host-a", "cancelled", kind=kind_of("BACKUP"), error=err_info)]
    rc, out, err = run(server, "backup", "create", "--volume", VOL, "--wait")
    assert rc == 1 and "operation bk-c cancelled: cancelled on request" in err
    assert _rows(out)["state"] == "cancelled"


def test_ctrl_c_while_waiting_prints_the_cancel_command(
    monkeypatch: pytest.MonkeyPatch, server: Server, agents: dict[str, FakeAgent]
) -> None:
    a = agents["host-a"]
    a.next_op = op("bk-i", "host-a", "running", kind=kind_of("BACKUP"))

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "wait_for", interrupted)
    rc, out, err = run(server, "backup", "create", "--volume", VOL, "--wait")
    assert rc == 130 and out == ""
    assert "qsnap ops cancel bk-i" in err and "goes on" in err
    assert not [c for c in a.calls if c[0] == "cancel"]  # nothing cancelled implicitly


# -- usage --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["backup", "create"],  # neither --volume nor --instance
        ["backup", "create", "--volume", VOL, "--instance", INST],
        ["backup", "restore", BK1],  # no target
        ["backup", "restore", BK1, "--to", "/x", "--volume", VOL],
        ["backup", "restore", BK1, "--to", "/x", "--disk-format", "vmdk"],
        ["backup", "prune", "--keep-last", "-1"],
        ["backup", "show"],
        ["backup"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    argv = ["--os-auth-type", "none", "--os-endpoint", "http://127.0.0.1:9", *args]
    assert cli.main(argv, stdout=io.StringIO(), stderr=err) == 2
    assert "error" in err.getvalue() + capsys.readouterr().err
