"""CinderMeta (the agent's client of qsnap's Cinder extension) against a local fake Cinder.

What matters is what recovery relies on: every call may be sent again, so a finalize that
finds the record already in the wanted state, and a finalize-error or delete that finds no
record, count as done; anything else is a typed MetaError (rejected = 4xx, else retried).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cinderclient.extension import Extension

from api_ext import cinderclient_ext
from hostagent.cinder import records as cinder_meta
from hostagent.cinder.records import CinderMeta, MetaAction, MetaError
from hostagent.cinder.status import NoAuthSettings, RetryPolicy

PROJECT = uuid.uuid4().hex
SID = str(uuid.uuid4())
VID = str(uuid.uuid4())
FAST = RetryPolicy(deadline=2.0, first_delay=0.01, max_delay=0.02, request_timeout=5.0)


class FakeCinder(ThreadingHTTPServer):
    """POST answers come from ``script`` (then 500); GET answers ``status`` (None: 404)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[int] = []
        self.status: str | None = None
        self.posts: list[tuple[str, Any]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v3"


class _Handler(BaseHTTPRequestHandler):
    server: FakeCinder

    def _answer(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.posts.append((self.path, json.loads(raw)))
        code = self.server.script.pop(0) if self.server.script else 500
        snap = {"id": SID, "volume_id": VID, "status": self.server.status or "creating"}
        self._answer(code, {"snapshot": snap} if code < 300 else {"conflict": {"message": "no"}})

    def do_GET(self) -> None:
        if self.server.status is None:
            self._answer(404, {"itemNotFound": {"message": "gone", "code": 404}})
        else:
            self._answer(
                200, {"snapshot": {"id": SID, "volume_id": VID, "status": self.server.status}}
            )

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[FakeCinder]:
    srv = FakeCinder()
    t = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _meta(fake: FakeCinder) -> CinderMeta:
    return CinderMeta(NoAuthSettings(fake.endpoint, PROJECT, "agent"), FAST, sleep=lambda s: None)


def test_create_then_finalize_send_the_extension_bodies(fake: FakeCinder) -> None:
    fake.script = [503, 202, 200]  # a 5xx is retried
    m = _meta(fake)
    m.create(SID, VID, "qsnap instance snapshot")
    m.apply(SID, MetaAction.FINALIZE_AVAILABLE)
    paths = {p for p, _ in fake.posts}
    assert paths == {f"/v3/{PROJECT}/snapshots/{SID}/action"}
    bodies = [b for _, b in fake.posts]
    assert bodies[0] == bodies[1] and bodies[1]["create-snapshot-metadata"]["volume_id"] == VID
    assert bodies[2] == {"finalize-snapshot-metadata": {"status": "available"}}


@pytest.mark.parametrize(
    ("action", "status", "done"),
    [
        (MetaAction.FINALIZE_AVAILABLE, "available", True),  # an earlier attempt landed
        (MetaAction.FINALIZE_AVAILABLE, "error", False),
        (MetaAction.FINALIZE_AVAILABLE, None, False),  # no record to make available
        (MetaAction.FINALIZE_ERROR, "error", True),
        (MetaAction.FINALIZE_ERROR, None, True),  # never recorded: nothing to fail
        (MetaAction.DELETE, None, True),  # already gone
        (MetaAction.DELETE, "creating", False),
    ],
)
def test_resent_calls_are_idempotent(
    fake: FakeCinder, action: MetaAction, status: str | None, done: bool
) -> None:
    fake.script, fake.status = [409 if status else 404], status
    if done:
        _meta(fake).apply(SID, action)
    else:
        with pytest.raises(MetaError) as info:
            _meta(fake).apply(SID, action)
        assert info.value.rejected


def test_unreachable_is_not_rejected(fake: FakeCinder) -> None:
    fake.script = []  # 500 forever
    with pytest.raises(MetaError) as info:
        _meta(fake).apply(SID, MetaAction.DELETE)
    assert not info.value.rejected and len(fake.posts) > 1


def test_meta_actions_never_look_like_cinder_statuses() -> None:
    cinder = {"creating", "available", "error", "deleting", "error_deleting"}
    assert all(a.value.startswith("qsnap:") and a.value not in cinder for a in MetaAction)
    assert MetaAction.of("creating") is None


def test_one_manager_per_extension_module() -> None:
    for module in (cinder_meta, cinderclient_ext):
        assert (
            Extension("qsnap_snapshots", module).manager_class is cinder_meta.QsnapSnapshotManager
        )


def test_agent_without_cinder_needs_no_endpoint_and_keeps_a_report_pending(tmp_path: Any) -> None:
    from hostagent.cinder.outbox import NoCinder, NotifyQueue
    from hostagent.cinder.status import Report
    from hostagent.journal.store import Journal

    j = Journal(str(tmp_path / "j.sqlite"), host="h")
    try:
        q = NotifyQueue(j, NoCinder())
        assert q.meta is None
        assert q.send(SID, Report.CREATE_DONE) is False  # journaled, never silently dropped
        (note,) = j.pending_notifications(due_only=False)
        assert "[cinder] enabled is false" in str(note.last_error)
        with pytest.raises(RuntimeError):
            q.send_meta(SID, MetaAction.DELETE, None)
    finally:
        j.close()


def test_a_delete_resent_after_a_failure_carries_the_same_active_file(
    fake: FakeCinder, tmp_path: Any
) -> None:
    """The active file rides in the journaled notice: the resend (even by another agent
    process) sends exactly what the live chain said when the layer went."""
    from hostagent.cinder.outbox import NotifyQueue
    from hostagent.journal.store import Journal
    from tests.unit.hostagent.fakes import FakeNotifier

    fake.script = []  # 500 until the RetryPolicy gives up: left pending
    active = cinder_meta.ActiveFile(f"volume-{VID}", "raw")
    j = Journal(str(tmp_path / "j.sqlite"), host="h")
    try:
        first = NotifyQueue(j, FakeNotifier(), meta=_meta(fake))
        assert first.send_meta(SID, MetaAction.DELETE, None, active) is False
        fake.script = [202]
        again = NotifyQueue(j, FakeNotifier(), meta=_meta(fake))  # a restarted agent
        assert again.flush(due_only=False) == 1
    finally:
        j.close()
    assert fake.posts[-1][1] == {
        "snapshot-delete-metadata": {"active": f"volume-{VID}", "format": "raw"}
    }
    assert cinder_meta.delete_body() == {"snapshot-delete-metadata": {}}
