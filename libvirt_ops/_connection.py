"""A libvirt connection that survives libvirtd restarts, with events on their own thread.

libvirt delivers domain events only while somebody runs its event loop, and only to
callbacks registered on a live connection. A restart of libvirtd closes the connection
and silently drops every registration, so this class keeps the subscriptions itself and
re-registers them on every reconnect. Waiting is always done on events with a deadline,
never by polling a guest (polling guest-ping floods libvirtd.log).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_ops.errors import LibvirtUnavailable

LOG = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation once and run it on a daemon thread.

    Must happen before the first connection is opened, or that connection never sees events.
    Idempotent and thread-safe: every user of libvirt in this process calls it.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        # libvirt prints every error to stderr by default; we raise them instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def _run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:  # pragma: no cover - keep the loop alive
                    LOG.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=_run, name="libvirt-events", daemon=True)
        _loop_thread.start()


EventCallback = Callable[..., None]


@dataclass
class _Subscription:
    event_id: int
    callback: EventCallback
    handle: int | None = None
    key: int = field(default=0)


class Connection:
    """One libvirt connection with automatic reconnect and persistent event subscriptions.

    ``get()`` returns a live ``virConnect``, reopening it when libvirtd went away. Callbacks
    subscribed with ``subscribe()`` are called from the event thread with libvirt's usual
    arguments (``conn, dom, ...``) and are re-registered after each reconnect; listeners of
    ``on_reconnect`` learn that events may have been missed and state must be re-read.
    """

    def __init__(self, uri: str = "qemu:///system", *, open_timeout: float = 30.0) -> None:
        ensure_event_loop()
        self.uri = uri
        self._open_timeout = open_timeout
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._subs: dict[int, _Subscription] = {}
        # libvirt takes ONE registration per (connection, event id): we fan out ourselves.
        self._handles: dict[int, int] = {}
        self._next_key = 1
        self._reconnect_listeners: list[Callable[[], None]] = []
        self.generation = 0
        self.get()

    # -- connection life ---------------------------------------------------------------
    def get(self) -> libvirt.virConnect:
        """A live connection; reopens (with a deadline) after libvirtd restarted."""
        with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                self._drop()
            return self._open()

    def _open(self) -> libvirt.virConnect:
        deadline = time.monotonic() + self._open_timeout
        delay = 0.05
        while True:
            try:
                conn = libvirt.open(self.uri)
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay > deadline:
                    raise LibvirtUnavailable(f"cannot connect to {self.uri}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        if not self.uri.startswith("test:"):  # the test driver has no keepalive/close
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._closed, None)
        self._conn = conn
        self._handles.clear()
        for event_id in {sub.event_id for sub in self._subs.values()}:
            self._register(conn, event_id)
        first = self.generation == 0
        self.generation += 1
        if not first:
            LOG.warning("reconnected to %s (generation %d)", self.uri, self.generation)
            for listener in list(self._reconnect_listeners):
                try:
                    listener()
                except Exception:  # a listener's bug must not break reconnects
                    LOG.exception("reconnect listener failed")
        return conn

    def _closed(self, conn: libvirt.virConnect, reason: int, opaque: Any) -> None:
        LOG.warning("connection to %s closed (reason %d)", self.uri, reason)
        with self._lock:
            if self._conn is conn:
                self._conn = None
        # Reopen from a separate thread: the event thread must not block on connect.
        threading.Thread(target=self._reopen_quietly, name="libvirt-reconnect", daemon=True).start()

    def _reopen_quietly(self) -> None:
        try:
            self.get()
        except LibvirtUnavailable:
            LOG.error("libvirtd at %s did not come back", self.uri)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def close(self) -> None:
        """Unregister everything and close; the object can not be used afterwards."""
        with self._lock:
            conn = self._conn
            if conn is not None:
                for handle in self._handles.values():
                    try:
                        conn.domainEventDeregisterAny(handle)
                    except libvirt.libvirtError:
                        pass
            self._handles.clear()
            self._subs.clear()
            self._drop()

    # -- events ------------------------------------------------------------------------
    def _register(self, conn: libvirt.virConnect, event_id: int) -> None:
        def fan_out(*args: Any) -> None:
            for sub in [x for x in list(self._subs.values()) if x.event_id == event_id]:
                try:
                    sub.callback(*args)
                except Exception:  # one subscriber's bug must not starve the others
                    LOG.exception("event callback for event %d failed", event_id)

        self._handles[event_id] = conn.domainEventRegisterAny(None, event_id, fan_out, None)

    def subscribe(self, event_id: int, callback: EventCallback) -> int:
        """Register ``callback`` for a domain event id on all domains; returns a key."""
        with self._lock:
            key = self._next_key
            self._next_key += 1
            self._subs[key] = _Subscription(event_id, callback, key=key)
            conn = self.get()
            if event_id not in self._handles:
                try:
                    self._register(conn, event_id)
                except libvirt.libvirtError:
                    del self._subs[key]
                    raise
            return key

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            sub = self._subs.pop(key, None)
            if sub is None or any(x.event_id == sub.event_id for x in self._subs.values()):
                return
            handle = self._handles.pop(sub.event_id, None)
            if handle is None or self._conn is None:
                return
            try:
                self._conn.domainEventDeregisterAny(handle)
            except libvirt.libvirtError:
                pass

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each reconnect (events in between may have been lost)."""
        self._reconnect_listeners.append(listener)

    def lookup(self, name_or_uuid: str) -> libvirt.virDomain:
        """A domain by name or UUID string."""
        conn = self.get()
        try:
            return conn.lookupByUUIDString(name_or_uuid)
        except libvirt.libvirtError:
            return conn.lookupByName(name_or_uuid)
