"""Inventory from libvirt's test:///default driver: read, refresh on events, publish."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from hostagent.inventory import InventoryTracker, read_attachments
from hostagent.rpc.contract import Inventory
from libvirt_ops import Connection

DEADLINE = 20.0  # a bound on waiting for the publisher thread, not a speed claim


def _domain_xml(name: str, disks: list[tuple[str, str | None]]) -> str:
    devs = []
    for i, (path, serial) in enumerate(disks):
        ser = f"<serial>{serial}</serial>" if serial else ""
        devs.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{path}'/><target dev='vd{chr(97 + i)}' bus='virtio'/>{ser}</disk>"
        )
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
        f"<memory>1024</memory><os><type>hvm</type></os><devices>{''.join(devs)}</devices>"
        "</domain>"
    )


@pytest.fixture
def conn() -> Iterator[Connection]:
    c = Connection("test:///default")
    yield c
    c.close()


@pytest.fixture
def make_domain(conn: Connection) -> Iterator[Callable[..., libvirt.virDomain]]:
    made: list[libvirt.virDomain] = []

    def make(disks: list[tuple[str, str | None]]) -> libvirt.virDomain:
        dom = conn.get().createXML(_domain_xml(f"inv-{uuid.uuid4().hex[:8]}", disks), 0)
        made.append(dom)
        return dom

    yield make
    for dom in made:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass


class Published:
    """A publisher that records inventories and lets a test wait for one that matches."""

    def __init__(self, fail_first: int = 0) -> None:
        self.items: list[Inventory] = []
        self.cond = threading.Condition()
        self.fail_first = fail_first

    def __call__(self, inv: Inventory) -> None:
        with self.cond:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise ConnectionError("bus down")
            self.items.append(inv)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[Inventory], bool], after: int = 0) -> Inventory:
        end = time.monotonic() + DEADLINE
        with self.cond:
            while True:
                hit = next((i for i in self.items[after:] if pred(i)), None)
                if hit is not None:
                    return hit
                left = end - time.monotonic()
                assert left > 0, f"no matching publication; got {self.items}"
                self.cond.wait(left)


def _vols(inv: Inventory) -> set[str]:
    return {v.volume_id for v in inv.volumes}


def test_read_attachments_keeps_volume_disks_only(conn: Connection, make_domain: Any) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4()).upper()
    dom = make_domain(
        [("/s/volume-a", a), ("/s/volume-b", b), ("/s/cfg", "config-drive"), ("/s/x", None)]
    )
    mine = [v for v in read_attachments(conn.get()) if v.instance_uuid == dom.UUIDString()]
    assert [(v.volume_id, v.target, v.source) for v in mine] == sorted(
        [(a, "vda", "/s/volume-a"), (b.lower(), "vdb", "/s/volume-b")]
    )
    assert all(v.domain_name == dom.name() for v in mine)


def test_lifecycle_events_publish_changes(conn: Connection, make_domain: Any) -> None:
    pub = Published()
    tracker = InventoryTracker(conn, "h1", pub, interval=60.0)
    tracker.start()
    try:
        first = pub.wait_for(lambda i: True)  # published once at start
        assert first.host == "h1"
        vol = str(uuid.uuid4())
        dom = make_domain([("/s/volume-x", vol)])
        added = pub.wait_for(lambda i: vol in _vols(i))
        assert added.generation > first.generation
        loc = tracker.locate(vol.upper())
        assert loc is not None and loc.instance_uuid == dom.UUIDString()
        dom.destroy()
        gone = pub.wait_for(lambda i: vol not in _vols(i), after=pub.items.index(added))
        assert gone.generation > added.generation
        assert tracker.locate(vol) is None
    finally:
        tracker.stop()


def test_periodic_republish_without_change_keeps_generation(conn: Connection) -> None:
    pub = Published()
    tracker = InventoryTracker(conn, "h1", pub, interval=0.1)
    tracker.start()
    try:
        pub.wait_for(lambda i: True)
        pub.wait_for(lambda i: True, after=1)
        pub.wait_for(lambda i: True, after=2)
        gens = {i.generation for i in pub.items[:3]}
        assert len(gens) == 1  # nothing changed: same generation republished
    finally:
        tracker.stop()


def test_publish_failure_is_retried_next_period(conn: Connection) -> None:
    pub = Published(fail_first=2)
    tracker = InventoryTracker(conn, "h1", pub, interval=0.1)
    tracker.start()
    try:
        pub.wait_for(lambda i: True)
        assert pub.fail_first == 0
    finally:
        tracker.stop()


class RecordingConnection:
    """Forwards get() to a real test:/// connection but keeps event callbacks to fire by hand."""

    def __init__(self, real: Connection) -> None:
        self.real = real
        self.subs: dict[int, Callable[..., None]] = {}
        self.reconnect: list[Callable[[], None]] = []

    def get(self) -> libvirt.virConnect:
        return self.real.get()

    def subscribe(self, event_id: int, cb: Callable[..., None]) -> int:
        self.subs[event_id] = cb
        return event_id

    def unsubscribe(self, key: int) -> None:
        self.subs.pop(key)

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        self.reconnect.append(listener)


@pytest.mark.parametrize("trigger", ["device-added", "device-removed", "reconnect"])
def test_device_events_and_reconnect_trigger_refresh(
    conn: Connection, make_domain: Any, trigger: str
) -> None:
    """The test driver cannot hot-plug, so device events and reconnects are fired by hand."""
    rec = RecordingConnection(conn)
    pub = Published()
    tracker = InventoryTracker(rec, "h1", pub, interval=3600.0)  # type: ignore[arg-type]
    tracker.start()
    try:
        pub.wait_for(lambda i: True)
        vol = str(uuid.uuid4())
        dom = make_domain([("/s/volume-y", vol)])  # no real events reach the tracker
        if trigger == "reconnect":
            rec.reconnect[0]()
        else:
            event = {
                "device-added": libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                "device-removed": libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
            }[trigger]
            rec.subs[event](conn.get(), dom, "virtio-disk1", None)
        pub.wait_for(lambda i: vol in _vols(i))
    finally:
        tracker.stop()
    assert rec.subs == {}  # stop() unsubscribed everything
