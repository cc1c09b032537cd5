"""Real Cinder (PyPI, NfsDriver) <-> stub Nova assisted-snapshot API <-> our notifier.

The stub Nova only answers the call Cinder makes and hands the outcome to CinderNotifier,
standing in for the host agent that issue 5 builds; Cinder itself is the real peer and
decides the snapshot's final status from what the notifier reported.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hostagent.cinder.status import CinderNotifier, NoAuthSettings, RetryPolicy
from testbed.cinder import CinderPeer, attach, wait_status


class StubNova(ThreadingHTTPServer):
    """``POST /v2.1/os-assisted-volume-snapshots``: record, answer, then report via notifier."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _NovaHandler)
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.outcome = "done"  # or "failed": what the notifier reports for the next create
        self.notifier: CinderNotifier | None = None
        self.reports: list[object] = []
        self.deletes: list[tuple[str, Any]] = []

    def report_delete(self, snapshot_id: str) -> None:
        assert self.notifier is not None
        time.sleep(0.2)
        self.reports.append(self.notifier.report_delete_done(snapshot_id))

    def report(self, snapshot_id: str) -> None:
        assert self.notifier is not None
        time.sleep(0.2)  # after Cinder got our answer, as the real agent would
        if self.outcome == "done":
            self.reports.append(self.notifier.report_create_done(snapshot_id))
        else:
            self.reports.append(self.notifier.report_create_failed(snapshot_id))


class _NovaHandler(BaseHTTPRequestHandler):
    server: StubNova

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.loads(raw)
        self.server.posts.append((self.path, dict(self.headers), body))
        snap = body["snapshot"]
        sid = snap["create_info"]["snapshot_id"]
        data = json.dumps({"snapshot": {"id": sid, "volumeId": snap["volume_id"]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-OpenStack-Nova-API-Version", "2.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        threading.Thread(target=self.server.report, args=(sid,), daemon=True).start()

    def do_DELETE(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        sid = url.path.rsplit("/", 1)[1]
        info = json.loads(urllib.parse.parse_qs(url.query)["delete_info"][0])
        self.server.deletes.append((url.path, info))
        self.send_response(204)
        self.send_header("X-OpenStack-Nova-API-Version", "2.1")
        self.end_headers()
        threading.Thread(target=self.server.report_delete, args=(sid,), daemon=True).start()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stub_nova() -> Iterator[StubNova]:
    srv = StubNova()
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def nova_endpoint(stub_nova: StubNova) -> str:
    return f"http://127.0.0.1:{stub_nova.server_address[1]}/v2.1"


@pytest.fixture(scope="module")
def wired(cinder: CinderPeer, stub_nova: StubNova) -> CinderPeer:
    stub_nova.notifier = CinderNotifier(
        NoAuthSettings(cinder.endpoint, cinder.project_id),
        RetryPolicy(deadline=30, first_delay=0.2, max_delay=2),
    )
    return cinder


def _attached_volume(peer: CinderPeer) -> Any:
    """A 1 GiB volume on the NFS share, attached to a made-up instance via attachments."""
    c = peer.client()
    v = c.volumes.create(1, name=f"qsnap-{uuid.uuid4().hex[:6]}")
    v = wait_status(c.volumes.get, v.id, {"available", "error"}, timeout=60)
    assert v.status == "available", peer.tail()
    return attach(c, v.id, str(uuid.uuid4()), timeout=60)


def test_volume_file_lands_on_the_share(wired: CinderPeer) -> None:
    v = _attached_volume(wired)
    assert v.status == "in-use"
    assert (wired.share_dir / f"volume-{v.id}").is_file()


def test_online_snapshot_via_nova_and_notifier_becomes_available(
    wired: CinderPeer, stub_nova: StubNova
) -> None:
    c = wired.client()
    v = _attached_volume(wired)
    stub_nova.outcome = "done"
    s = c.volume_snapshots.create(v.id, force=True)
    s = wait_status(c.volume_snapshots.get, s.id, {"available", "error"}, timeout=60)
    assert s.status == "available", wired.tail()

    path, headers, body = stub_nova.posts[-1]
    assert path == "/v2.1/os-assisted-volume-snapshots"
    assert headers["X-OpenStack-Nova-API-Version"] == "2.1"
    new_file = f"volume-{v.id}.{s.id}"
    assert body["snapshot"]["volume_id"] == v.id
    info = body["snapshot"]["create_info"]
    assert (info["snapshot_id"], info["type"], info["new_file"]) == (s.id, "qcow2", new_file)
    # Cinder pre-created the overlay (relative backing to the volume) and the ledger
    overlay = wired.share_dir / new_file
    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["backing-filename"] == f"volume-{v.id}"
    ledger = json.loads((wired.share_dir / f"volume-{v.id}.info").read_text())
    assert ledger == {"active": new_file, s.id: new_file}
    assert stub_nova.reports[-1].attempts == 1  # type: ignore[attr-defined]


def test_failed_create_reported_by_notifier_gives_error(
    wired: CinderPeer, stub_nova: StubNova
) -> None:
    c = wired.client()
    v = _attached_volume(wired)
    stub_nova.outcome = "failed"
    s = c.volume_snapshots.create(v.id, force=True)
    s = wait_status(c.volume_snapshots.get, s.id, {"available", "error"}, timeout=60)
    assert s.status == "error"
    assert stub_nova.posts[-1][2]["snapshot"]["create_info"]["snapshot_id"] == s.id


def test_online_delete_of_newest_asks_nova_for_a_pull_and_completes(
    wired: CinderPeer, stub_nova: StubNova
) -> None:
    """The stub merges nothing: this checks the wire contract and Cinder's state machine."""
    c = wired.client()
    v = _attached_volume(wired)
    stub_nova.outcome = "done"
    s = c.volume_snapshots.create(v.id, force=True)
    s = wait_status(c.volume_snapshots.get, s.id, {"available", "error"}, timeout=60)
    assert s.status == "available", wired.tail()
    c.volume_snapshots.delete(s.id)
    deadline = time.monotonic() + 60
    while any(x.id == s.id for x in c.volume_snapshots.list()):
        assert time.monotonic() < deadline, wired.tail()
        time.sleep(0.25)
    path, info = stub_nova.deletes[-1]
    assert path == f"/v2.1/os-assisted-volume-snapshots/{s.id}"
    # newest snapshot's file is active -> Cinder asks for a pull of the volume into it
    assert info == {
        "volume_id": v.id,
        "type": "qcow2",
        "file_to_merge": None,
        "merge_target_file": None,
    }
