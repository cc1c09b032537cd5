"""Operation notifications: payload, driver choice, background sending, and a real
oslo.messaging Notifier over the in-process ``fake://`` transport fed by a real journal."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.journal import events as ev
from hostagent.journal.model import ErrorInfo, Operation, OperationKind, OperationState
from hostagent.journal.store import Journal

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
VOL2 = "1b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP = "aaaaaaaa-1111-4222-8333-444444444444"
INST = "cccccccc-1111-4222-8333-444444444444"


def _op(**kw: Any) -> Operation:
    base: dict[str, Any] = dict(
        id=uuid.uuid4(),
        kind=OperationKind.ASSISTED_CREATE,
        state=OperationState.PENDING,
        request={"volume_id": VOL, "snapshot_id": SNAP, "new_file": "x"},
        idempotency_key=SNAP,
        locks=(),
        host="h1",
        created_at=1.0,
        updated_at=2.0,
    )
    base.update(kw)
    return Operation(**base)


class RecordingNotifier:
    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = fail
        self.gate = gate

    def _send(self, prio: str, event: str, payload: dict[str, Any]) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise ConnectionError("bus down")
        self.sent.append((prio, event, payload))

    def info(self, ctxt: dict[str, Any], event_type: str, payload: dict[str, Any]) -> None:
        self._send("info", event_type, payload)

    def error(self, ctxt: dict[str, Any], event_type: str, payload: dict[str, Any]) -> None:
        self._send("error", event_type, payload)


def test_payload_of_an_assisted_create() -> None:
    op = _op()
    p = ev.payload(op)
    assert p["id"] == str(op.id) and p["kind"] == "assisted_create" and p["host"] == "h1"
    assert p["volume_ids"] == [VOL] and p["snapshot_id"] == SNAP
    assert p["state"] == "pending" and p["error"] is None and p["result"] == {}
    assert ev.event_type(op, begun=True) == ev.EVENT_START


def test_payload_of_a_failed_instance_snapshot_summarizes_the_result() -> None:
    result = {
        "quiesced": True,
        "steps": [{"name": "x", "data": {"big": "y" * 9999}}],
        "snapshots": [
            {"volume_id": VOL, "snapshot_id": SNAP, "file": "f1", "extra": 1},
            {"volume_id": VOL2, "snapshot_id": SNAP, "file": "f2"},
        ],
        "note": "n" * 2000,
    }
    op = _op(
        kind=OperationKind.INSTANCE_SNAPSHOT,
        state=OperationState.FAILED,
        request={"instance_uuid": INST, "volume_ids": None, "quiesce": "require"},
        result=result,
        error=ErrorInfo("GuestAgentError", "freeze failed"),
    )
    p = ev.payload(op)
    assert p["volume_ids"] == [VOL, VOL2]  # all disks: learnt from the result
    assert p["instance_uuid"] == INST and p["snapshot_id"] is None
    assert p["error"] == {"type": "GuestAgentError", "message": "freeze failed"}
    assert "steps" not in p["result"]
    assert p["result"]["snapshots"][0] == {"volume_id": VOL, "snapshot_id": SNAP, "file": "f1"}
    assert p["result"]["quiesced"] is True and len(p["result"]["note"]) < 600
    assert ev.event_type(op, begun=False) == ev.EVENT_ERROR
    ok = _op(state=OperationState.SUCCEEDED)
    assert ev.event_type(ok, begun=False) == ev.EVENT_END


def test_driver_choice() -> None:
    assert ev.driver_for(make_conf()) == []  # nothing configured: no notifications
    url = {"oslo_messaging_notifications.transport_url": "rabbit://u:p@h:5672/"}
    assert ev.driver_for(make_conf(overrides=url)) == ["messagingv2"]
    explicit = {"oslo_messaging_notifications.driver": ["log"]}
    assert ev.driver_for(make_conf(overrides=explicit)) == ["log"]
    noop = {**url, "oslo_messaging_notifications.driver": ["noop"]}
    assert ev.driver_for(make_conf(overrides=noop)) == []
    assert ev.make_events(make_conf()) == (None, None)


def test_events_are_sent_in_order_from_a_thread_and_drained_on_stop() -> None:
    gate = threading.Event()
    notifier = RecordingNotifier(gate=gate)
    events = ev.OperationEvents(notifier)
    events.start()
    op = _op()
    events.operation_begun(op)  # returns at once although the notifier is blocked
    events.operation_finished(_op(id=op.id, state=OperationState.SUCCEEDED))
    assert notifier.sent == []
    gate.set()
    events.stop()
    assert [(p, e) for p, e, _ in notifier.sent] == [
        ("info", ev.EVENT_START),
        ("info", ev.EVENT_END),
    ]
    assert notifier.sent[1][2]["state"] == "succeeded"


def test_a_full_queue_drops_and_a_failing_notifier_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = ev.OperationEvents(RecordingNotifier(fail=True), max_pending=1)
    events.operation_begun(_op())
    events.operation_begun(_op())  # not started: the queue holds one
    assert events.dropped == 1
    events.start()
    events.stop()
    assert "failed" in caplog.text


def test_real_notifier_over_fake_transport_fed_by_the_journal(tmp_path: Path) -> None:
    """The whole path: journal -> listener -> oslo.messaging Notifier -> a notification listener."""
    om = ev.messaging()
    conf = make_conf(
        overrides={
            "host": "hostN",
            "transport_url": "fake://",
            "oslo_messaging_notifications.driver": ["messagingv2"],
        }
    )
    transport = om.get_notification_transport(conf)
    got: list[tuple[str, str, str, dict[str, Any]]] = []

    class Endpoint:
        def info(
            self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, md: Any
        ) -> None:
            got.append(("info", publisher_id, event_type, payload))

        def error(
            self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, md: Any
        ) -> None:
            got.append(("error", publisher_id, event_type, payload))

    listener = om.get_notification_listener(
        transport, [om.Target(topic="notifications")], [Endpoint()], executor="threading"
    )
    listener.start()
    events, made = ev.make_events(conf, transport=transport)
    assert events is not None and made is None
    events.start()
    j = Journal(str(tmp_path / "j.db"), host="hostN", listener=events)
    try:
        op = j.begin(
            OperationKind.ASSISTED_DELETE, {"volume_id": VOL, "snapshot_id": SNAP}
        ).operation
        j.finish(op.id, OperationState.FAILED, error=RuntimeError("merge failed"))
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:  # each priority has its own queue
            time.sleep(0.05)
    finally:
        events.stop()
        listener.stop()
        listener.wait()
        transport.cleanup()
        j.close()
    got.sort(key=lambda g: g[0] != "info")
    assert [(p, pub, e) for p, pub, e, _ in got] == [
        ("info", "qsnap-agent.hostN", ev.EVENT_START),
        ("error", "qsnap-agent.hostN", ev.EVENT_ERROR),
    ]
    end = got[1][3]
    assert end["id"] == str(op.id) and end["state"] == "failed" and end["volume_ids"] == [VOL]
    assert end["error"] == {"type": "RuntimeError", "message": "merge failed"}
