"""oslo.messaging notifications of operation start/end/error, fed by the journal.

Why at the journal: every operation, whoever runs it (service, recovery, later kinds), is
begun and finished there, so hooking :class:`OperationEvents` in as the journal's listener
covers them all without touching service code. Events go out from one background thread
through a bounded queue: a slow or dead notification bus can delay or drop an event (logged),
but never an operation. Event types: ``qsnap.operation.start|end|error``, publisher
``qsnap-agent.<host>``.

Driver choice (``[oslo_messaging_notifications]``): an explicit ``driver`` wins; with none
set, ``messagingv2`` when that group's own ``transport_url`` is set (an operator who points
notifications somewhere wants them), otherwise nothing is sent. Publishing on the RPC bus by
default would fill a ``notifications.info`` queue nobody consumes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from oslo_config import cfg

from hostagent.journal.model import JsonDict, Operation, OperationState
from hostagent.rpc.messaging import messaging

LOG = logging.getLogger(__name__)

EVENT_START = "qsnap.operation.start"
EVENT_END = "qsnap.operation.end"
EVENT_ERROR = "qsnap.operation.error"
PUBLISHER = "qsnap-agent"
_MAX_TEXT = 512


class Notifier(Protocol):
    """What we use of ``oslo_messaging.Notifier`` (a recorder in unit tests)."""

    def info(self, ctxt: dict[str, Any], event_type: str, payload: JsonDict) -> None: ...

    def error(self, ctxt: dict[str, Any], event_type: str, payload: JsonDict) -> None: ...


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + "..."
    return value


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def result_summary(result: JsonDict | None) -> JsonDict:
    """The operation's result without bulky parts: scalars, plus ids of snapshots made."""
    summary: JsonDict = {}
    for key, value in (result or {}).items():
        if _scalar(value):
            summary[key] = _short(value)
        elif key == "snapshots" and isinstance(value, list):
            summary[key] = [
                {k: s.get(k) for k in ("volume_id", "snapshot_id", "file")}
                for s in value
                if isinstance(s, dict)
            ]
    return summary


def _volume_ids(op: Operation) -> list[str]:
    """Volumes the operation names: the request's, else the snapshots it made."""
    found: list[str] = []
    req = op.request
    candidates: list[object] = [req.get("volume_id")]
    if isinstance(req.get("volume_ids"), list):
        candidates += req["volume_ids"]
    snaps = (op.result or {}).get("snapshots")
    if isinstance(snaps, list):
        candidates += [s.get("volume_id") for s in snaps if isinstance(s, dict)]
    for vid in candidates:
        if isinstance(vid, str) and vid not in found:
            found.append(vid)
    return found


def payload(op: Operation) -> JsonDict:
    """The notification payload of ``op`` as journaled (same shape for all three events)."""
    sid = op.request.get("snapshot_id")
    return {
        "id": str(op.id),
        "kind": op.kind.value,
        "host": op.host,
        "volume_ids": _volume_ids(op),
        "instance_uuid": op.request.get("instance_uuid"),
        "snapshot_id": sid if isinstance(sid, str) else None,
        "state": op.state.value,
        "error": None
        if op.error is None
        else {"type": op.error.type, "message": _short(op.error.message)},
        "result": result_summary(op.result),
        "created_at": op.created_at,
        "updated_at": op.updated_at,
    }


def event_type(op: Operation, *, begun: bool) -> str:
    if begun:
        return EVENT_START
    return EVENT_END if op.state is OperationState.SUCCEEDED else EVENT_ERROR


class OperationEvents:
    """A journal listener that publishes start/end/error from its own thread."""

    def __init__(self, notifier: Notifier, *, max_pending: int = 1000) -> None:
        self._notifier = notifier
        self._queue: queue.Queue[tuple[str, JsonDict] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def operation_begun(self, op: Operation) -> None:
        self._put(event_type(op, begun=True), op)

    def operation_finished(self, op: Operation) -> None:
        self._put(event_type(op, begun=False), op)

    def _put(self, event: str, op: Operation) -> None:
        try:
            self._queue.put_nowait((event, payload(op)))
        except queue.Full:
            self.dropped += 1
            LOG.warning("notification %s of operation %s dropped: queue full", event, op.id)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="op-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then end the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            LOG.warning("operation notifications: queue still full at stop")
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # stop marker
                return
            self.publish(*item)

    def publish(self, event: str, body: JsonDict) -> None:
        """Send one event now; a failure is logged, never raised."""
        send = self._notifier.error if event == EVENT_ERROR else self._notifier.info
        try:
            send({}, event, body)
        except Exception:
            LOG.exception("notification %s of operation %s failed", event, body.get("id"))


def driver_for(conf: cfg.ConfigOpts) -> list[str]:
    """The notification drivers to use; empty means none (see the module docstring)."""
    group = conf.oslo_messaging_notifications
    drivers = [d for d in group.driver if d and d != "noop"]
    if group.driver:
        return drivers
    return ["messagingv2"] if group.transport_url else []


def make_events(
    conf: cfg.ConfigOpts,
    *,
    transport: Any = None,
    notifier_factory: Callable[..., Notifier] | None = None,
) -> tuple[OperationEvents | None, Any]:
    """Events for ``conf`` (or ``None`` when notifications are off) and the transport made.

    ``transport`` reuses an existing one (one process with ``fake://``, where separate
    transports do not see each other); otherwise a notification transport is created here
    and returned so the caller can clean it up.
    """
    drivers = driver_for(conf)
    if not drivers:
        return None, None
    om = messaging()
    made = None
    if transport is None:
        transport = made = om.get_notification_transport(conf)
    topics: Iterable[str] = conf.oslo_messaging_notifications.topics
    factory = notifier_factory or om.Notifier
    notifiers = [
        factory(
            transport,
            publisher_id=f"{PUBLISHER}.{conf.host}",
            driver=name,  # one name: a list would be taken as one (unhashable) name
            topics=list(topics),
            retry=conf.oslo_messaging_notifications.retry,
        )
        for name in drivers
    ]
    notifier = notifiers[0] if len(notifiers) == 1 else _Fanout(notifiers)
    return OperationEvents(notifier), made


class _Fanout:
    """Several drivers configured: oslo.messaging's Notifier takes one name at a time."""

    def __init__(self, notifiers: list[Notifier]) -> None:
        self._notifiers = notifiers

    def info(self, ctxt: dict[str, Any], event_type: str, payload: JsonDict) -> None:
        for n in self._notifiers:
            n.info(ctxt, event_type, payload)

    def error(self, ctxt: dict[str, Any], event_type: str, payload: JsonDict) -> None:
        for n in self._notifiers:
            n.error(ctxt, event_type, payload)
