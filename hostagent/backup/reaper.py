"""Backup overlays left behind when their disk leaves a running guest: merged down at once.

A checkpoint overlay (``volume-<vid>.qsnap-bk-<key>``, or a killed backup's temporary one)
holds guest writes that Cinder's ``.info`` ledger does not name: Cinder's active file is
below it. While the guest runs that is fine. Once the disk leaves it (the domain is shut off
or destroyed, or the disk is detached), whatever starts it next — Nova builds the disk from
Cinder's connection info, i.e. the ledger's active file — would silently lose those writes.
So the agent merges such overlays into Cinder's active file as soon as it sees the disk go:
offline commit (whole chain inspected, formats pinned), shut-off definitions that still
name the overlay moved to the file below (a plain ``virsh start`` keeps working), file
removed; one journaled operation (kind backup, action ``release``) per volume.

qemu-img commit takes QEMU's image locks, so if a guest was already restarted on the active
file (a hard reboot that won the race) the merge is refused and nothing is written. An
overlay that is not in the live chain of the guest now using the volume, or overlays that do
not form one stack, are reported instead (ERROR log, a FAILED ``StrandedOverlay``
operation): their data stays in the file for an operator; nothing is guessed.

Only stops this agent saw are acted on (``STOPPED`` destroyed/shutdown/crashed/failed,
``DEVICE_REMOVED``): a migrated or saved domain still uses its chain elsewhere or later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import libvirt

import libvirt_ops as lo
import qcow2
from hostagent.backup.online import BACKUP_NAMING, is_backup_overlay
from hostagent.errors import QsnapAgentError
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.model import StepName
from hostagent.rpc.contract import Inventory
from qcow2.naming import is_uuid

LOG = logging.getLogger(__name__)

#: STOPPED details after which nothing uses the chain any more (not MIGRATED, SAVED, ...).
_GONE = frozenset(
    {
        libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
        libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED,
    }
)
#: How long a sweep waits for an unfinished operation on the volume (e.g. a backup that is
#: putting its chain back after the domain stopped) before judging the files.
BUSY_WAIT = 60.0


class StrandedOverlay(QsnapAgentError):
    """Overlays of a volume hold data no guest or ledger sees; left for an operator."""


@dataclass(frozen=True)
class _Seen:
    domain_uuid: str
    directory: str


class OverlayReaper:
    """Watches domain stops and detaches; merges the volumes' backup overlays down.

    ``remember`` is fed every inventory refresh (the volumes' directories must be known
    before the domain is gone); events only queue work for the reaper's own thread, which
    may wait on a busy volume without holding a pool worker.
    """

    def __init__(self, conn: lo.Connection, journal: jn.Journal, *, roots: list[str]) -> None:
        self._conn, self._j, self._roots = conn, journal, roots
        self._seen: dict[str, _Seen] = {}
        self._guard = threading.Lock()
        self._work: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._keys: list[int] = []
        self._thread: threading.Thread | None = None

    # -- feeding --------------------------------------------------------------------------
    def remember(self, inventory: Inventory) -> None:
        """Record where each attached volume's files live (tracker thread)."""
        with self._guard:
            for v in inventory.volumes:
                self._seen[v.volume_id] = _Seen(v.instance_uuid, os.path.dirname(v.source))

    def _on_lifecycle(self, _c: Any, dom: Any, event: int, detail: int, *_: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail in _GONE:
            self._work.put((dom.UUIDString(), "stopped"))

    def _on_removed(self, _c: Any, dom: Any, *_: Any) -> None:
        self._work.put((dom.UUIDString(), "detached"))

    # -- life -----------------------------------------------------------------------------
    def start(self) -> None:
        self._keys.append(
            self._conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle)
        )
        self._keys.append(
            self._conn.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed)
        )
        self._thread = threading.Thread(target=self._run, name="overlay-reaper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        for key in self._keys:
            self._conn.unsubscribe(key)
        self._keys.clear()
        if self._thread is not None:
            self._work.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            dom_uuid, why = item
            try:
                left = self._left(dom_uuid)
            except Exception:  # libvirt gone for a moment: never kill the thread
                LOG.exception("volumes of stopped domain %s: unknown; overlays left", dom_uuid)
                continue
            for vid in left:
                try:
                    self.sweep(vid, why)
                except Exception:  # never kill the thread; the operation says what failed
                    LOG.exception("releasing the backup overlays of volume %s failed", vid)
                with self._guard:  # the next attach is remembered again by the tracker
                    if self._seen.get(vid, _Seen("", "")).domain_uuid == dom_uuid:
                        del self._seen[vid]

    def _left(self, dom_uuid: str) -> list[str]:
        """Volumes last seen on ``dom_uuid`` that no running domain here uses any more."""
        with self._guard:
            mine = [v for v, s in self._seen.items() if s.domain_uuid == dom_uuid]
        attached = {str(d.serial).lower() for d in self._live_disks()}
        return [v for v in mine if v not in attached]

    def _live_disks(self) -> list[lo.Disk]:
        c = self._conn.get()
        out: list[lo.Disk] = []
        for dom in c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):  # it may stop meanwhile
                out.extend(d for d in lo.domain_disks(dom) if d.serial)
        return out

    # -- one volume -----------------------------------------------------------------------
    def sweep(
        self, volume_id: str, why: str, *, directory: str | None = None
    ) -> ops.Operation | None:
        """Merge down (or report) ``volume_id``'s backup overlays; None if it has none."""
        if not is_uuid(volume_id):
            raise ValueError(f"bad volume id {volume_id!r}")
        if directory is None:
            with self._guard:
                seen = self._seen.get(volume_id)
            if seen is None:
                return None
            directory = seen.directory
        if not _overlays(directory, volume_id):
            return None  # the common case: no backup overlay, nothing to wait for
        self._await_idle(volume_id)
        names = _overlays(directory, volume_id)
        if not names or self._all_live(volume_id, names):
            return None
        request = {"action": "release", "volume_ids": [volume_id], "directory": directory,
                   "overlays": names, "why": why}  # fmt: skip
        op = self._j.begin(ops.OperationKind.BACKUP, request, locks=[f"volume:{volume_id}"])
        return self._release(op.operation.id, volume_id, directory, names)

    def _await_idle(self, volume_id: str) -> None:
        deadline = time.monotonic() + BUSY_WAIT
        states = (ops.OperationState.PENDING, ops.OperationState.RUNNING)
        while self._j.list_operations(states=states, lock=f"volume:{volume_id}"):
            if time.monotonic() >= deadline:
                raise StrandedOverlay(f"volume {volume_id} stays busy; overlays left as they are")
            time.sleep(0.5)

    def _all_live(self, vid: str, names: list[str]) -> bool:
        """A running guest's chain holds every overlay: they are in use, not stranded."""
        for d in self._live_disks():
            if str(d.serial).lower() == vid:
                return set(names) <= {os.path.basename(layer.path) for layer in d.chain}
        return False

    def _release(
        self, op_id: uuid.UUID, vid: str, directory: str, names: list[str]
    ) -> ops.Operation:
        try:
            in_use = next((d for d in self._live_disks() if str(d.serial).lower() == vid), None)
            if in_use is not None:
                live = {os.path.basename(layer.path) for layer in in_use.chain}
                if any(n not in live for n in names):
                    raise StrandedOverlay(
                        f"volume {vid} runs again on {os.path.basename(in_use.source)} without "
                        f"{[n for n in names if n not in live]}: the writes in them are not "
                        "in the guest's view; files left for an operator"
                    )
                result: dict[str, Any] = {"released": [], "in_use": True}
            else:
                result = {"released": self._merge_stack(op_id, vid, directory, names)}
        except Exception as exc:
            LOG.error("backup overlays of volume %s: %s", vid, exc)
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
        else:
            self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)
        return self._j.get(op_id)

    def _stack(self, vid: str, directory: str, names: list[str]) -> list[tuple[str, str]]:
        """(overlay, backing format) top first; they must form one stack over another file."""
        below: dict[str, tuple[str, str]] = {}
        for n in names:
            path = os.path.join(directory, n)
            with qcow2.inspect_chain(path, roots=self._roots, naming=BACKUP_NAMING) as chain:
                top = chain.layers[0]
                if top.backing_name is None or top.backing_fmt is None:
                    raise StrandedOverlay(f"{n} has no backing file to merge into")
                below[n] = (top.backing_name, top.backing_fmt)
        tops = [n for n in names if n not in {b for b, _ in below.values()}]
        order: list[tuple[str, str]] = []
        cur = tops[0] if len(tops) == 1 else ""
        while cur in below:
            order.append((cur, below[cur][1]))
            cur = below[cur][0]
        if len(order) != len(names):
            raise StrandedOverlay(f"overlays of volume {vid} are not one stack: {below}")
        return order

    def _merge_stack(
        self, op_id: uuid.UUID, vid: str, directory: str, names: list[str]
    ) -> list[str]:
        """Merge the overlays top first; each into the file below, then removed."""
        done: list[str] = []
        for name, fmt in self._stack(vid, directory, names):
            path = os.path.join(directory, name)
            with self._j.step(op_id, StepName.MERGE, {"top": name}) as h:
                into = qcow2.merge_overlay(path, roots=self._roots, naming=BACKUP_NAMING)
                h.data["into"] = os.path.basename(into)
                h.data["redefined"] = lo.retarget_inactive_disks(self._conn, path, into, fmt)
            with self._j.step(op_id, StepName.REMOVE, {"file": name}):
                os.unlink(path)
            done.append(name)
        return done

    # -- after a restart ------------------------------------------------------------------
    def resume(self) -> list[str]:
        """Finish release operations a restart interrupted (before recovery fails them):
        a half-done commit leaves the base torn under the overlay, so it must run again."""
        states = (ops.OperationState.PENDING, ops.OperationState.RUNNING)
        decided: list[str] = []
        for op in self._j.list_operations(kind=ops.OperationKind.BACKUP, states=states):
            if op.request.get("action") != "release":
                continue
            vid, directory = str(op.request["volume_ids"][0]), str(op.request["directory"])
            for s in self._j.steps(op.id):
                if s.state is ops.StepState.PLANNED:
                    self._j.step_undone(op.id, s.seq, {"recovery": "run again after a restart"})
            names = _overlays(directory, vid)
            if names:
                self._release(op.id, vid, directory, names)
            else:  # the last removal was done: nothing is left to merge
                self._j.finish(op.id, ops.OperationState.SUCCEEDED, result={"released": []})
            decided.append(f"{vid}: {self._j.get(op.id).state.value}")
        return decided


def _overlays(directory: str, volume_id: str) -> list[str]:
    """The volume's backup overlays (checkpoint or temporary) in its directory, sorted."""
    try:
        return sorted(n for n in os.listdir(directory) if is_backup_overlay(n, volume_id))
    except FileNotFoundError:  # the share or directory is gone: nothing of ours is left
        return []
