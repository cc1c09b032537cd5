"""Which volume is attached where on this host, kept current from libvirt and published.

The truth is the live XML of running domains (Nova sets ``<serial>`` to the volume id). A
refresh re-reads all of it: cheap (a few XMLDesc calls) and immune to missed events. Events
(lifecycle, device added/removed) and reconnects only mark the view dirty; one publisher
thread refreshes, publishes on change, and republishes every ``interval`` anyway, so an API
that restarted or lost a fanout message converges. libvirt callbacks never block: they run
on libvirt's event thread, which must not wait on libvirt or the message bus.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import libvirt

from hostagent.rpc.contract import Inventory, VolumeAttachment
from libvirt_ops import Connection, LibvirtUnavailable, domain_disks
from qcow2.naming import is_uuid

LOG = logging.getLogger(__name__)

Publisher = Callable[[Inventory], None]

_EVENTS = (
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
)


def read_attachments(conn: libvirt.virConnect) -> tuple[VolumeAttachment, ...]:
    """Volume disks (serial is a UUID) of every running domain, sorted for comparison."""
    found: list[VolumeAttachment] = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            disks = domain_disks(dom)
            name, uuid = dom.name(), dom.UUIDString()
        except libvirt.libvirtError as exc:  # the domain went away between list and read
            LOG.debug("skipping a domain that vanished: %s", exc)
            continue
        for disk in disks:
            if disk.serial is not None and is_uuid(disk.serial.lower()):
                found.append(
                    VolumeAttachment(disk.serial.lower(), uuid, name, disk.target, disk.source)
                )
    return tuple(sorted(found, key=lambda v: (v.volume_id, v.instance_uuid, v.target)))


class InventoryTracker:
    """Keeps ``current()`` up to date and calls ``publish`` on change and periodically.

    ``on_refresh`` (optional) sees every inventory read, on the tracker's thread.

    ``generation`` grows by one per observed change, so receivers can drop stale updates.
    """

    def __init__(
        self,
        conn: Connection,
        host: str,
        publish: Publisher,
        *,
        interval: float = 60.0,
        on_refresh: Callable[[Inventory], None] | None = None,
    ) -> None:
        self._conn = conn
        self._on_refresh = on_refresh
        self._host = host
        self._publish = publish
        self._interval = interval
        self._lock = threading.Lock()
        self._inventory = Inventory(host, (), generation=0)
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._keys: list[int] = []
        self._thread: threading.Thread | None = None
        self._sent_once = False

    # -- reading ------------------------------------------------------------------------
    def current(self) -> Inventory:
        with self._lock:
            return self._inventory

    def locate(self, volume_id: str) -> VolumeAttachment | None:
        """Where ``volume_id`` is attached on this host, from the last refresh."""
        want = volume_id.lower()
        return next((v for v in self.current().volumes if v.volume_id == want), None)

    def refresh(self) -> tuple[Inventory, bool]:
        """Re-read libvirt now; returns the inventory and whether it changed."""
        volumes = read_attachments(self._conn.get())
        with self._lock:
            changed = volumes != self._inventory.volumes
            if changed:
                self._inventory = Inventory(
                    self._host, volumes, generation=self._inventory.generation + 1
                )
            return self._inventory, changed

    # -- event hooks (libvirt's event thread: never block here) --------------------------
    def mark_dirty(self, *_args: object) -> None:
        self._dirty.set()

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe to events and reconnects, publish once, then run the publisher thread."""
        for event_id in _EVENTS:
            self._keys.append(self._conn.subscribe(event_id, self.mark_dirty))
        self._conn.on_reconnect(self.mark_dirty)
        self._dirty.set()
        self._thread = threading.Thread(target=self._run, name="inventory", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._dirty.set()
        for key in self._keys:
            self._conn.unsubscribe(key)
        self._keys.clear()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("inventory thread did not stop within %.1f s", timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            woke = self._dirty.wait(self._interval)
            if self._stopping.is_set():
                return
            self._dirty.clear()
            try:
                inventory, changed = self.refresh()
            except (libvirt.libvirtError, LibvirtUnavailable):
                LOG.warning("inventory refresh failed; retrying", exc_info=True)
                self._stopping.wait(min(1.0, self._interval))
                self._dirty.set()
                continue
            if self._on_refresh is not None:
                try:
                    self._on_refresh(inventory)
                except Exception:  # an observer never stops publishing
                    LOG.exception("inventory observer failed")
            # At start and on change at once, otherwise once per interval.
            if changed or not woke or not self._sent_once:
                self._send(inventory)

    def _send(self, inventory: Inventory) -> None:
        try:
            self._publish(inventory)
            self._sent_once = True
        except Exception:  # the bus may be down: the next period republishes
            LOG.warning(
                "publishing inventory generation %d failed", inventory.generation, exc_info=True
            )
