"""The ``qsnap`` CLI as a subprocess -> qsnap-api process -> RabbitMQ -> stub agent process.

The stub agent (tests/functional/hostagent/stub_agent.py) advances instance snapshots and
agent-owned deletes one stage per status poll, so ``--wait`` shows real progress lines; a
``--quiesce require`` snapshot fails there. Real guests are the e2e suite's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import service_api as api
from hostagent.config import make_conf
from hostagent.rpcapi import InventoryFanout, get_transport
from tests.functional.api_ext.test_nova_compat import _spawn, _stop
from tests.functional.hostagent.stub_agent import INSTANCE, VOL_BUSY, VOL_OK

pytestmark = pytest.mark.functional
ROOT = Path(__file__).resolve().parents[3]
QSNAP = str(ROOT / ".venv" / "bin" / "qsnap")
HOST = "stub-host-cli"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def api_url(rabbitmq: Any, logdir: Path) -> Iterator[str]:
    argv = [sys.executable, "-m", "tests.functional.hostagent.stub_agent"]
    argv += ["--transport-url", rabbitmq.transport_url, "--host", HOST]
    agent, _ = _spawn("stub-agent-cli", argv, logdir)
    conf = logdir / "qsnap-api.conf"
    conf.write_text(
        f"[DEFAULT]\ntransport_url = {rabbitmq.transport_url}\n"
        "[api]\nbind_host = 127.0.0.1\nbind_port = 0\nauth_strategy = noauth\n"
        f"noauth_roles = admin\nhosts = {HOST}\nrpc_timeout = 20\n"
    )
    argv = [sys.executable, "-m", "api_ext.server", "--config-file", str(conf), "--ready-line"]
    server, line = _spawn("qsnap-api-cli", argv, logdir)
    yield f"http://127.0.0.1:{line.split()[1]}"
    assert _stop("qsnap-api-cli", server) == 0
    assert _stop("stub-agent-cli", agent) == 0


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
