"""The ``qsnap`` CLI as a subprocess -> qsnap-api process -> RabbitMQ -> stub agent process.

The stub agent (testbed/stub_agent.py) advances instance snapshots and
agent-owned deletes one stage per status poll, so ``--wait`` shows real progress lines; a
``--quiesce require`` snapshot fails there. Backups go through the same path (RPC 1.2) to the
stub's in-memory repository. Real guests are the e2e suite's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import InventoryFanout, get_transport
from testbed.service import REPO, start_api
from testbed.stub_agent import INSTANCE, VOL_BUSY, VOL_OK, start_stub_agent

pytestmark = pytest.mark.functional
QSNAP = str(REPO / ".venv" / "bin" / "qsnap")
HOST = "stub-host-cli"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def api_url(rabbitmq: Any, logdir: Path) -> Iterator[str]:
    url = rabbitmq.transport_url
    agent = start_stub_agent(logdir, url, HOST, name="stub-agent-cli", timeout=60)
    api_opts = {"noauth_roles": "admin", "hosts": HOST, "rpc_timeout": 20}
    server, api_url = start_api(logdir, url, api_opts, name="qsnap-api-cli", timeout=60)
    yield api_url
    assert server.stop(30) == 0, server.tail()
    assert agent.stop(30) == 0, agent.tail()


def qsnap(url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_") and k != "QSNAP_URL"}
    argv = [QSNAP, "--os-auth-type", "none"]
    if url:
        argv += ["--os-endpoint", url]
    proc = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def _rows(table: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in table.splitlines()[2:])


def test_cli_snapshot_ops_and_delete(api_url: str) -> None:
    # create, waiting: plain progress lines on stderr (not a TTY), the result table on stdout
    rc, out, err = qsnap(api_url, "snapshot", "create", "--instance", INSTANCE,
                         "--poll-interval", "0.1")  # fmt: skip
    assert rc == 0, err
    first = _rows(out)
    assert (first["state"], first["host"], first["result.quiesced"]) == ("succeeded", HOST, "true")
    assert first["snapshot"].endswith(f" of volume {VOL_OK}")
    lines = err.splitlines()
    assert lines[0] == f"operation {first['id']}: queued"
    assert f"operation {first['id']}: running, step snapshot, 50%" in lines
    assert lines[-1] == f"operation {first['id']}: succeeded, step ledger, 100%"

    # the same as JSON: stdout parses, and is the API's operation object
    args = ["--instance", INSTANCE, "--volume", VOL_OK, "--quiesce", "off", "-f", "json"]
    rc, out, err = qsnap(api_url, "snapshot", "create", *args, "--poll-interval", "0.1")
    assert rc == 0, err
    second = json.loads(out)["operation"]
    assert second["state"] == "succeeded" and second["result"]["quiesced"] is False
    assert second["result"]["progress"] == {"cur": 2, "end": 2}
    [snap] = second["result"]["snapshots"]

    # ops list / show
    rc, out, _ = qsnap(api_url, "ops", "list", "-f", "json", "--kind", "snapshot_instance")
    ids = [o["id"] for o in json.loads(out)["operations"]]
    assert ids[:2] == [second["id"], first["id"]]  # newest first
    rc, out, _ = qsnap(api_url, "ops", "list", "--limit", "1")
    assert rc == 0 and [line.split()[0] for line in out.splitlines()[2:]] == [second["id"]]
    rc, out, _ = qsnap("", "ops", "show", first["id"], env={"QSNAP_URL": api_url})
    assert rc == 0 and _rows(out)["state"] == "succeeded"
    rc, out, _ = qsnap(api_url, "ops", "show", second["id"], "--format", "json")
    assert json.loads(out)["operation"] == second

    # delete that snapshot, waiting; a second delete of it is the agent's 404
    args = ["--volume", VOL_OK, snap["snapshot_id"], "--wait", "--poll-interval", "0.1"]
    rc, out, err = qsnap(api_url, "snapshot", "delete", *args, "-f", "json")
    assert rc == 0, err
    deleted = json.loads(out)["operation"]
    assert (deleted["state"], deleted["snapshot_id"]) == ("succeeded", snap["snapshot_id"])
    # 25% is shown; 75% came sooner than the 2 s between plain progress lines
    assert f"operation {deleted['id']}: running, step merge, 25%" in err.splitlines()
    rc, out, err = qsnap(api_url, "snapshot", "delete", "--volume", VOL_OK, snap["snapshot_id"])
    assert (rc, out) == (1, "")
    assert err.startswith(f"qsnap: error: HTTP 404: snapshot {snap['snapshot_id']} is not in")

    # a failed operation: exit 1 with its error
    rc, out, err = qsnap(api_url, "snapshot", "create", "--instance", INSTANCE,
                         "--quiesce", "require", "--poll-interval", "0.1")  # fmt: skip
    assert rc == 1
    assert _rows(out)["error"] == "QuiesceFailed: the stub guest cannot freeze"
    assert err.endswith("failed: the stub guest cannot freeze\n")

    # unknown operation, unknown instance: the API's messages
    rc, _, err = qsnap(api_url, "ops", "show", "deadbeef")
    assert (rc, err) == (1, "qsnap: error: HTTP 404: operation deadbeef not found\n")
    rc, _, err = qsnap(api_url, "snapshot", "create", "--instance", VOL_OK, "--no-wait")
    assert rc == 1 and "HTTP 404: instance" in err


def test_cli_busy_disk_is_409_and_usage_errors(api_url: str, rabbitmq: Any) -> None:
    transport = get_transport(make_conf(), rabbitmq.transport_url)
    try:
        vols = tuple(
            api.VolumeAttachment(v, INSTANCE, "instance-0001", t, f"/x/volume-{v}")
            for v, t in ((VOL_OK, "vdb"), (VOL_BUSY, "vdc"))
        )
        InventoryFanout(transport)(api.Inventory(HOST, vols, generation=5))
        deadline = time.monotonic() + 30
        while True:
            rc, _, err = qsnap(api_url, "snapshot", "delete", "--volume", VOL_BUSY, VOL_OK)
            if "HTTP 404" not in err or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        transport.cleanup()
    assert rc == 1
    assert err == f"qsnap: error: HTTP 409: disk of volume {VOL_BUSY} has a block job\n"
    rc, _, err = qsnap("", "ops", "list")
    assert rc == 2 and "--os-auth-type none needs --os-endpoint" in err
    rc, _, err = qsnap(api_url, "ops", "list", "--state", "done")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = qsnap("http://127.0.0.1:9", "ops", "list")
    assert rc == 1 and err.startswith("qsnap: error: cannot reach the qsnap API")


def test_cli_backup_steps(api_url: str) -> None:
    """Every ``qsnap backup`` command once, through the real API, RabbitMQ and RPC 1.2."""
    # full backup of a volume, waiting: progress lines, then the backup in the result
    rc, out, err = qsnap(api_url, "backup", "create", "--volume", VOL_OK, "--wait",
                         "--poll-interval", "0.1")  # fmt: skip
    assert rc == 0, err
    rows = _rows(out)
    assert (rows["state"], rows["host"]) == ("succeeded", HOST)
    assert rows["backup"].endswith(f"of volume {VOL_OK} (full, read 64.0 MiB, stored 32.0 MiB)")
    full_id = rows["backup"].split()[0]
    assert f"operation {rows['id']}: running, step read, 25%" in err.splitlines()

    # incremental of the instance's volumes, as JSON
    rc, out, err = qsnap(api_url, "backup", "create", "--instance", INSTANCE, "--incremental",
                         "--wait", "--poll-interval", "0.1", "-f", "json")  # fmt: skip
    assert rc == 0, err
    [inc] = json.loads(out)["operation"]["result"]["backups"]
    assert (inc["incremental"], inc["bytes_read"], inc["fallback_reason"]) == (True, 4194304, None)

    # list (newest first) / show
    rc, out, _ = qsnap(api_url, "backup", "list", "--volume", VOL_OK, "-f", "json")
    listed = json.loads(out)["backups"]
    assert [b["id"] for b in listed[:2]] == [inc["backup_id"], full_id]
    assert listed[0]["parent"] == full_id
    rc, out, _ = qsnap(api_url, "backup", "list")
    assert rc == 0 and out.splitlines()[2].split()[3] == "incremental"
    rc, out, _ = qsnap(api_url, "backup", "show", inc["backup_id"])
    assert rc == 0 and _rows(out)["parent"] == full_id

    # verify and restore, waiting; restoring onto the same path again is refused (400)
    rc, out, err = qsnap(api_url, "backup", "verify", full_id, "--wait", "--poll-interval", "0.1")
    assert rc == 0, err
    assert _rows(out)["result.ok"] == "true"
    target = f"/x/restored-{full_id}.raw"
    args = ["--to", target, "--disk-format", "raw", "--wait", "--poll-interval", "0.1"]
    rc, out, err = qsnap(api_url, "backup", "restore", full_id, *args)
    assert rc == 0, err
    assert (_rows(out)["result.path"], _rows(out)["result.format"]) == (f'"{target}"', '"raw"')
    rc, out, err = qsnap(api_url, "backup", "restore", full_id, "--to", target)
    assert (rc, out) == (1, "")
    assert err == f"qsnap: error: HTTP 400: restore target {target} exists\n"

    # prune (an operation, followed): a dry run deletes nothing; keep_last=1 deletes the full
    rc, out, err = qsnap(api_url, "backup", "prune", "--keep-last", "1", "--dry-run", "-f",
                         "json", "--poll-interval", "0.1")  # fmt: skip
    assert rc == 0, err
    assert full_id in json.loads(out)["operation"]["result"]["deleted"]
    rc, out, _ = qsnap(api_url, "backup", "show", full_id)
    assert rc == 0
    rc, out, err = qsnap(api_url, "backup", "prune", "--keep-last", "1", "--volume", VOL_OK,
                         "--poll-interval", "0.1")  # fmt: skip
    assert rc == 0 and full_id in _rows(out)["result.deleted"]
    assert "step prune, 50%" in err
    rc, out, err = qsnap(api_url, "backup", "show", full_id)
    assert (rc, err) == (1, f"qsnap: error: HTTP 404: no backup {full_id}\n")

    # ops cancel: a running verify is cancelled (--wait: exit 0 once it ended cancelled);
    # cancelling it again, or a snapshot operation, is 409; an unknown id 404
    rc, out, _ = qsnap(api_url, "backup", "verify", inc["backup_id"], "-f", "json")
    vop = json.loads(out)["operation"]["id"]
    rc, out, err = qsnap(api_url, "ops", "cancel", vop, "--wait", "--poll-interval", "0.1")
    assert rc == 0, err
    assert _rows(out)["state"] == "cancelled"
    rc, _, err = qsnap(api_url, "ops", "cancel", vop)
    assert rc == 1 and "HTTP 409" in err and "already ended: cancelled" in err
    rc, out, _ = qsnap(api_url, "snapshot", "create", "--instance", INSTANCE, "--no-wait",
                       "-f", "json")  # fmt: skip
    sop = json.loads(out)["operation"]["id"]
    rc, _, err = qsnap(api_url, "ops", "cancel", sop)
    assert rc == 1 and "HTTP 409" in err and "not cancellable" in err
    rc, _, err = qsnap(api_url, "ops", "cancel", "0" * 32)
    assert rc == 1 and "HTTP 404" in err

    # delete; again: 404; an unknown volume: 404 before any agent
    rc, out, _ = qsnap(api_url, "backup", "delete", inc["backup_id"])
    assert (rc, out) == (0, f"backup {inc['backup_id']} deleted\n")
    rc, _, err = qsnap(api_url, "backup", "delete", inc["backup_id"])
    assert (rc, err) == (1, f"qsnap: error: HTTP 404: no backup {inc['backup_id']}\n")
    rc, _, err = qsnap(api_url, "backup", "create", "--volume", INSTANCE)
    assert rc == 1 and "HTTP 404: volume" in err
