"""``qsnap-agent`` as a separate process on a real guest: assisted create/delete over RPC.

Cinder's side is a ``CinderRecorder`` (a tiny HTTP server standing in for Cinder's
``os-update_snapshot_status`` API) so the reports the agent sends can be asserted exactly;
the real-Cinder end to end belongs to the API issue. The overlay is pre-created exactly as
Cinder's remotefs driver does it (relative backing name), names go through the RPC edge.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from libvirt_ops import find_disk

pytestmark = pytest.mark.functional
ROOT = Path(__file__).resolve().parents[3]
PROJECT = uuid.uuid4().hex
CTX: dict[str, Any] = {"request_id": "req-test"}


class CinderRecorder:
    """Records ``POST .../snapshots/<id>/action`` bodies; answers 202 like Cinder."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)))
                parts = self.path.split("/")
                if "snapshots" in parts and parts[-1] == "action":
                    sid = parts[parts.index("snapshots") + 1]
                    recorder.updates.append((sid, body["os-update_snapshot_status"]))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v3"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent(rabbitmq: Any, share: Any, bed_dir: Path) -> Iterator[tuple[AgentAPI, CinderRecorder]]:
    cinder = CinderRecorder()
    host = f"agent-{uuid.uuid4().hex[:6]}"
    conf_file = bed_dir / "agent.conf"
    conf_file.write_text(
        f"[DEFAULT]\nhost = {host}\ntransport_url = {rabbitmq.transport_url}\n"
        "use_stderr = true\n"  # oslo.log: stdout carries only the READY line
        f"state_path = {bed_dir / 'state'}\n"
        f"[shares]\nallowed_roots = {share.root}\n"
        f"[agent]\nworkers = 2\nmerge_timeout = 120\n"
        f"[cinder]\nauth_type = noauth\nendpoint = {cinder.endpoint}\nproject_id = {PROJECT}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostagent.cli", "--config-file", str(conf_file), "--ready-line"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(bed_dir / "agent.log", "w"),
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.stdout is not None
    deadline, line = time.monotonic() + 60, ""
    while time.monotonic() < deadline and proc.poll() is None and line.strip() != "READY":
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        pytest.fail("agent did not start: " + (bed_dir / "agent.log").read_text()[-3000:])
    transport = get_transport(make_conf(), rabbitmq.transport_url)
    try:
        yield AgentAPI(transport, host, timeout=60), cinder
    finally:
        transport.cleanup()
        proc.terminate()
        rc = proc.wait(timeout=60)
        cinder.close()
        assert rc == 0, (bed_dir / "agent.log").read_text()[-3000:]


def _final(client: AgentAPI, op: api.Operation, timeout: float = 90.0) -> api.Operation:
    deadline = time.monotonic() + timeout
    while op.state not in (api.OperationState.SUCCEEDED, api.OperationState.FAILED):
        assert time.monotonic() < deadline, f"operation {op.id} still {op.state}"
        time.sleep(0.3)
        op = client.get_operation(CTX, op.id)
    return op


def _chain(g: Any) -> list[str]:
    return [
        os.path.basename(lay.path) for lay in find_disk(g.dom, volume_id=g.disks[0].volume_id).chain
    ]


def _sha_in_guest(g: Any, path: str) -> str:
    g.check(["/bin/sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
    return bytes(g.check(["sha256sum", path])).split()[0].decode()


def _precreate(g: Any, snap: str) -> str:
    """Exactly Cinder's online create: relative backing = the current top's basename."""
    top = _chain(g)[0]
    name = f"volume-{g.disks[0].volume_id}.{snap}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top,
         str(g.dir / name)],
        check=True,
    )  # fmt: skip
    return name


def _create(client: AgentAPI, g: Any, snap: str, new_file: str) -> api.Operation:
    info = {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    return client.create_assisted_snapshot(CTX, g.disks[0].volume_id, info)


def _delete(client: AgentAPI, g: Any, snap: str, to_merge: str | None, target: str | None) -> Any:
    info = {"type": "qcow2", "file_to_merge": to_merge, "merge_target_file": target}
    return client.delete_assisted_snapshot(CTX, g.disks[0].volume_id, snap, info)


def _check(path: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "check", "-U", "-f", "qcow2", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_assisted_create_delete_and_bad_requests(agent: Any, guest: Any) -> None:
    client, cinder = agent
    g = guest
    vol, base = g.disks[0].volume_id, _chain(guest)[0]
    data = f"/data/before-{uuid.uuid4().hex[:6]}"
    g.check(["dd", "if=/dev/urandom", f"of={data}", "bs=64k", "count=4"], 60)
    digest = _sha_in_guest(g, data)

    # 1. create: the pre-created overlay becomes the live top; Cinder hears creating/90%
    s1 = str(uuid.uuid4())
    f1 = _precreate(g, s1)
    op = _final(client, _create(client, g, s1, f1))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert [(s["name"], s["state"]) for s in op.result["steps"]] == [
        ("validate", "done"), ("snapshot", "done"), ("notify", "done")
    ]  # fmt: skip
    assert _chain(g) == [f1, base]
    assert cinder.updates == [(s1, {"status": "creating", "progress": "90%"})]
    again = _create(client, g, s1, f1)  # Nova/Cinder retry: same operation, nothing redone
    assert again.id == op.id and _chain(g) == [f1, base]

    # 3. bad requests touch nothing and journal nothing
    listing = sorted(os.listdir(g.dir))
    ops_before = client.list_operations(CTX)
    s_bad = str(uuid.uuid4())
    with pytest.raises(api.VolumeNotFound):
        client.create_assisted_snapshot(
            CTX, str(uuid.uuid4()), {"snapshot_id": s_bad, "type": "qcow2", "new_file": f1}
        )
    with pytest.raises(api.InvalidRequest):
        _create(client, g, s_bad, f"../volume-{vol}.{s_bad}")
    with pytest.raises(api.InvalidRequest):
        _delete(client, g, s_bad, f"volume-{vol}.{uuid.uuid4()}", base)
    assert sorted(os.listdir(g.dir)) == listing
    assert [o.id for o in client.list_operations(CTX)] == [o.id for o in ops_before]
    assert _chain(g) == [f1, base]

    # 2a. commit case: two snapshots, delete the older (middle file into base)
    s2 = str(uuid.uuid4())
    f2 = _precreate(g, s2)
    assert _final(client, _create(client, g, s2, f2)).state is api.OperationState.SUCCEEDED
    assert _chain(g) == [f2, f1, base]
    op = _final(client, _delete(client, g, s1, f1, base))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert [s["name"] for s in op.result["steps"]] == ["validate", "merge", "notify"]
    assert _chain(g) == [f2, base]
    assert (g.dir / f1).exists()  # Cinder deletes it, never the agent
    assert cinder.updates[-1] == (s1, {"status": "deleting", "progress": "90%"})

    # 2b. pull case (Cinder's "active file is the snapshot's file"): flatten into the active
    op = _final(client, _delete(client, g, s2, None, None))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert _chain(g) == [f2]
    assert (g.dir / base).exists()
    assert cinder.updates[-1] == (s2, {"status": "deleting", "progress": "90%"})
    assert _sha_in_guest(g, data) == digest
    _check(g.dir / f2)
    assert hashlib.sha256(b"").hexdigest() != digest  # the file really had content
