"""CinderNotifier against a tiny local HTTP server that plays Cinder's snapshot action API."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hostagent.cinder.status import (
    CinderNotifier,
    NoAuthSettings,
    NoneAuthSettings,
    NotifyRejected,
    NotifyUnreachable,
    Report,
    RetryPolicy,
)

PROJECT = uuid.uuid4().hex
FAST = RetryPolicy(deadline=5.0, first_delay=0.01, max_delay=0.05, request_timeout=5.0)


class FakeCinder(ThreadingHTTPServer):
    """Answers each POST with the next (code, body) of ``script``; records every request."""

    def __init__(self, script: list[tuple[int, dict[str, object] | None]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.requests: list[tuple[str, dict[str, str], object]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v3"


class _Handler(BaseHTTPRequestHandler):
    server: FakeCinder

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, dict(self.headers), json.loads(raw)))
        code, body = self.server.script.pop(0) if self.server.script else (500, None)
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[FakeCinder]:
    srv = FakeCinder([])
    t = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _notifier(fake: FakeCinder, sleeps: list[float] | None = None) -> CinderNotifier:
    settings = NoAuthSettings(endpoint=fake.endpoint, project_id=PROJECT, user_id="u1")
    if sleeps is None:
        return CinderNotifier(settings, FAST)
    return CinderNotifier(settings, FAST, sleep=sleeps.append)


def test_create_done_retries_503_then_sends_cinders_action_body(fake: FakeCinder) -> None:
    fake.script = [
        (503, {"serviceUnavailable": {"code": 503, "message": "x"}}),
        (503, None),
        (202, None),
    ]
    sleeps: list[float] = []
    sid = str(uuid.uuid4())
    res = _notifier(fake, sleeps).report_create_done(sid)
    assert (res.snapshot_id, res.report, res.attempts) == (sid, Report.CREATE_DONE, 3)
    assert sleeps == [0.01, 0.02]  # exponential backoff between the three tries
    assert len(fake.requests) == 3
    path, headers, body = fake.requests[-1]
    assert path == f"/v3/{PROJECT}/snapshots/{sid}/action"
    assert body == {"os-update_snapshot_status": {"status": "creating", "progress": "90%"}}
    assert headers["X-Auth-Token"] == f"u1:{PROJECT}"


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("report_create_failed", {"status": "error"}),
        ("report_delete_done", {"status": "deleting", "progress": "90%"}),
        ("report_delete_failed", {"status": "error_deleting"}),
    ],
)
def test_each_report_sends_its_status(
    fake: FakeCinder, method: str, expected: dict[str, str]
) -> None:
    fake.script = [(202, None)]
    sid = str(uuid.uuid4())
    getattr(_notifier(fake), method)(sid)
    assert fake.requests[0][2] == {"os-update_snapshot_status": expected}


def test_400_is_not_retried_and_carries_cinders_message(fake: FakeCinder) -> None:
    msg = "Snapshot status available not allowed to transition to deleting"
    fake.script = [(400, {"badRequest": {"code": 400, "message": msg}}), (202, None)]
    sleeps: list[float] = []
    sid = str(uuid.uuid4())
    with pytest.raises(NotifyRejected) as ei:
        _notifier(fake, sleeps).report_delete_done(sid)
    assert ei.value.code == 400 and msg in ei.value.detail
    assert (ei.value.snapshot_id, ei.value.report, ei.value.attempts) == (
        sid,
        Report.DELETE_DONE,
        1,
    )
    assert len(fake.requests) == 1 and sleeps == []


def test_404_is_rejected_too(fake: FakeCinder) -> None:
    fake.script = [(404, {"itemNotFound": {"code": 404, "message": "Snapshot x not found"}})]
    with pytest.raises(NotifyRejected) as ei:
        _notifier(fake).report_create_failed(str(uuid.uuid4()))
    assert ei.value.code == 404 and "not found" in ei.value.detail


def test_persistent_5xx_gives_up_at_the_deadline(fake: FakeCinder) -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    policy = RetryPolicy(deadline=1.0, first_delay=0.1, max_delay=0.4, request_timeout=5.0)
    n = CinderNotifier(
        NoAuthSettings(fake.endpoint, PROJECT), policy, sleep=sleep, clock=lambda: now[0]
    )
    fake.script = [(500, None)] * 50
    with pytest.raises(NotifyUnreachable) as ei:
        n.report_create_done(str(uuid.uuid4()))
    # 0.1 + 0.2 + 0.4 + 0.3 (clipped to the deadline) -> 5 tries, then give up
    assert ei.value.attempts == 5 and len(fake.requests) == 5
    assert now[0] == pytest.approx(1.0)
    assert "HTTP 500" in ei.value.detail


def test_connection_refused_is_retried_until_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    policy = RetryPolicy(deadline=0.5, first_delay=0.1, max_delay=0.1, request_timeout=2.0)
    endpoint = f"http://127.0.0.1:{port}/v3/{PROJECT}"
    n = CinderNotifier(NoneAuthSettings(endpoint), policy, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(NotifyUnreachable) as ei:
        n.report_delete_failed(str(uuid.uuid4()))
    assert ei.value.attempts == 6
    assert "Connect" in ei.value.detail


def test_none_auth_uses_the_endpoint_as_given(fake: FakeCinder) -> None:
    fake.script = [(202, None)]
    sid = str(uuid.uuid4())
    n = CinderNotifier(NoneAuthSettings(f"{fake.endpoint}/{PROJECT}"), FAST)
    n.report_create_done(sid)
    assert fake.requests[0][0] == f"/v3/{PROJECT}/snapshots/{sid}/action"


def test_available_cannot_be_reported() -> None:
    """Cinder never leaves its wait loop for 'available': no path may send it."""
    assert {r.value[0] for r in Report} == {"creating", "error", "deleting", "error_deleting"}
    public = {m for m in vars(CinderNotifier) if not m.startswith("_")}
    assert public == {
        "report_create_done",
        "report_create_failed",
        "report_delete_done",
        "report_delete_failed",
    }


def test_snapshot_id_must_be_a_uuid(fake: FakeCinder) -> None:
    with pytest.raises(ValueError):
        _notifier(fake).report_create_done("../../volumes/x")
    assert fake.requests == []


def test_bad_retry_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(deadline=0)
    with pytest.raises(ValueError):
        RetryPolicy(first_delay=2.0, max_delay=1.0)
