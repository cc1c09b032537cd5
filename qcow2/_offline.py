"""Snapshot create/delete of a DETACHED volume, with Cinder's remotefs semantics.

Mirrors ``RemoteFSSnapDriverBase._create_snapshot`` / ``_delete_snapshot`` (offline
branches), ``_do_create_snapshot``, ``_img_commit`` and ``_rebase_img``:

- create: new overlay ``volume-<v>.<s>`` on the active file; ``ledger[s] = active = new``.
- delete of snapshot ``s`` mapped to file F (its point-in-time data is F's backing B):
  commit F into B (``commit -d``); if F was active, B becomes active; otherwise the file H
  above F is rebased (``rebase -u``) onto B by basename with the format pinned; F is removed.

Differences from Cinder, all for safety: the whole chain is inspected before any tool runs
and every ledger name is checked against it; formats are pinned everywhere (also for the
commit's backing); the ledger is written crash-safe, after the commit but before the file
above is rebased and F unlinked (Cinder unlinks F first and writes the ledger last). So a
crash at any point leaves correct data and a ledger naming only files in the live chain,
and a re-run finishes the job (see :func:`delete_snapshot_offline`). Callers serialise
operations on one volume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from qcow2 import _qemu_img
from qcow2._chain import LayerInfo
from qcow2._ledger import Ledger, read_ledger, write_ledger
from qcow2._overlay import create_overlay
from qcow2._qemu_img import Progress
from qcow2._volume_files import inspect_layers, unlink_durable
from qcow2.errors import (
    ImageExists,
    LedgerError,
    SnapshotExists,
    SnapshotNotFound,
    UnsafeImage,
)
from qcow2.naming import CINDER, Naming, is_uuid, snapshot_file_name, volume_base_name


@dataclass(frozen=True)
class VolumeState:
    """A volume's ledger checked against its real chain (top first)."""

    volume_dir: str
    volume_id: str
    ledger: Ledger
    layers: tuple[LayerInfo, ...]

    @property
    def names(self) -> list[str]:
        return [os.path.basename(layer.path) for layer in self.layers]

    def layer(self, name: str) -> tuple[int, LayerInfo]:
        index = self.names.index(name)
        return index, self.layers[index]

    def path(self, name: str) -> str:
        return os.path.join(self.volume_dir, name)


def _require_uuid(kind: str, value: str) -> None:
    if not is_uuid(value):
        raise LedgerError(f"{value!r} is not a {kind} id")


def load_volume(
    volume_dir: str,
    volume_id: str,
    *,
    base_fmt: str,
    roots: Sequence[str],
    naming: Naming = CINDER,
) -> VolumeState:
    """Read the ledger, inspect the whole chain from its active file, cross-check both.

    ``base_fmt`` is the format of ``volume-<uuid>`` as Cinder recorded it (admin metadata);
    it is never probed. No ledger means "no snapshots", as in Cinder.
    """
    _require_uuid("volume", volume_id)
    volume_dir = os.path.abspath(volume_dir)
    base = volume_base_name(volume_id)
    ledger = read_ledger(volume_dir, volume_id, naming=naming) or Ledger(active=base)
    active_fmt = base_fmt if ledger.active == base else "qcow2"
    layers = inspect_layers(
        os.path.join(volume_dir, ledger.active), roots=roots, naming=naming, fmt=active_fmt
    )
    state = VolumeState(volume_dir, volume_id, ledger, layers)
    names = state.names
    bottom = layers[-1]
    if names[-1] != base or bottom.fmt != base_fmt:
        raise UnsafeImage(
            bottom.path, "chain-bottom", f"chain must end in {base} ({base_fmt}), not {bottom.fmt}"
        )
    for layer in layers:
        if os.path.dirname(os.path.abspath(layer.path)) != volume_dir:
            raise UnsafeImage(layer.path, "backing-dir", f"not in {volume_dir}")
        if layer is not bottom and layer.fmt != "qcow2":
            raise UnsafeImage(layer.path, "format", "only the bottom layer may be raw")
    ledger_file = os.path.join(volume_dir, f"volume-{volume_id}.info")
    for snap, name in ledger.snapshots.items():
        if name not in names[:-1]:
            raise LedgerError(
                f"{ledger_file}: snapshot {snap} maps to {name}, which is not an overlay "
                f"in the chain {names}"
            )
    return state


def create_snapshot_offline(
    volume_dir: str,
    volume_id: str,
    snapshot_id: str,
    *,
    base_fmt: str,
    roots: Sequence[str],
    naming: Naming = CINDER,
    mode: int = 0o660,
) -> Ledger:
    """Take snapshot ``snapshot_id`` of a detached volume; return the new ledger.

    Idempotent: a finished create returns the ledger unchanged; an overlay left by a crash
    before the ledger was written is adopted if it is exactly what we would have created.
    """
    _require_uuid("snapshot", snapshot_id)
    state = load_volume(volume_dir, volume_id, base_fmt=base_fmt, roots=roots, naming=naming)
    ledger = state.ledger
    new_name = snapshot_file_name(volume_id, snapshot_id)
    if snapshot_id in ledger.snapshots:
        if ledger.snapshots[snapshot_id] == new_name == ledger.active:
            return ledger
        raise SnapshotExists(
            f"snapshot {snapshot_id} already maps to {ledger.snapshots[snapshot_id]}"
        )
    active = state.layers[0]
    new_path = state.path(new_name)
    if os.path.lexists(new_path):
        _adopt_leftover(state, new_path, roots=roots, naming=naming)
    else:
        create_overlay(
            new_path, active.path, backing_fmt=active.fmt, roots=roots, naming=naming, mode=mode
        )
    new = Ledger(active=new_name, snapshots={**ledger.snapshots, snapshot_id: new_name})
    write_ledger(state.volume_dir, volume_id, new, naming=naming)
    return new


def _adopt_leftover(state: VolumeState, path: str, *, roots: Sequence[str], naming: Naming) -> None:
    """Accept an overlay a crashed create left: on the active file, pinned, same size."""
    active = state.layers[0]
    try:
        made = inspect_layers(path, roots=roots, naming=naming, fmt="qcow2")
    except UnsafeImage as exc:
        raise ImageExists(f"{path}: exists and is not a leftover of ours: {exc}") from exc
    top = made[0]
    if (
        len(made) != len(state.layers) + 1
        or top.backing_name != os.path.basename(active.path)
        or top.backing_fmt != active.fmt
        or top.virtual_size != active.virtual_size
    ):
        raise ImageExists(f"{path}: exists and is not an overlay of {active.path}")


def delete_snapshot_offline(
    volume_dir: str,
    volume_id: str,
    snapshot_id: str,
    *,
    base_fmt: str,
    roots: Sequence[str],
    naming: Naming = CINDER,
    progress: Progress | None = None,
) -> Ledger:
    """Delete snapshot ``snapshot_id`` of a detached volume; return the new ledger.

    Raises :class:`SnapshotNotFound` when the ledger has no such snapshot and no crash
    leftover of it exists (Cinder treats that as success: catch it to do the same).
    Re-running after a crash at any step completes the deletion.
    """
    _require_uuid("snapshot", snapshot_id)
    state = load_volume(volume_dir, volume_id, base_fmt=base_fmt, roots=roots, naming=naming)
    ledger = state.ledger
    if snapshot_id not in ledger.snapshots:
        if _finish_interrupted(state, snapshot_id, progress):
            return ledger
        raise SnapshotNotFound(f"volume {volume_id} has no snapshot {snapshot_id}")
    name = ledger.snapshots[snapshot_id]
    remaining = {k: v for k, v in ledger.snapshots.items() if k != snapshot_id}
    index, _layer = state.layer(name)
    if index == 0:
        # T0 base <- T1 snapshot file (active): commit down, base becomes active.
        base = state.layers[1]
        _qemu_img.commit(
            state.path(name), backing_path=base.path, backing_fmt=base.fmt, progress=progress
        )
        new = Ledger(active=os.path.basename(base.path), snapshots=remaining)
        write_ledger(state.volume_dir, volume_id, new, naming=naming)
        unlink_durable(state.path(name))
    else:
        # T0 base <- T1 snapshot file <- T2 higher file: commit down, then (after the
        # ledger no longer maps the merged file) point T2 at T0.
        new = Ledger(active=ledger.active, snapshots=remaining)
        _commit_down(state, index, progress)
        write_ledger(state.volume_dir, volume_id, new, naming=naming)
        _bypass(state, index)
        unlink_durable(state.path(name))
    if progress is not None:
        progress(100.0, 100.0)
    load_volume(volume_dir, volume_id, base_fmt=base_fmt, roots=roots, naming=naming)
    return new


def _commit_down(state: VolumeState, index: int, progress: Progress | None) -> None:
    """Commit layer ``index`` into the layer below it (the merged file is left intact)."""
    merged, base = state.layers[index], state.layers[index + 1]
    _qemu_img.commit(merged.path, backing_path=base.path, backing_fmt=base.fmt, progress=progress)


def _bypass(state: VolumeState, index: int) -> None:
    """Point the layer above ``index`` at the layer below it: relative name, pinned format."""
    base, higher = state.layers[index + 1], state.layers[index - 1]
    _qemu_img.rebase_unsafe(
        higher.path, backing_name=os.path.basename(base.path), backing_fmt=base.fmt
    )


def _finish_interrupted(state: VolumeState, snapshot_id: str, progress: Progress | None) -> bool:
    """Complete a delete interrupted after its ledger write; True if there was one.

    The ledger drops a snapshot only after its file was committed down, so a file named for
    the snapshot that nothing maps any more holds no data of its own: if it is still an
    intermediate layer it is committed again (safe: no snapshot's point-in-time data lives
    in its backing, since nothing maps it) and bypassed; then it is removed. A file outside
    the chain is an overlay whose create never reached the ledger, or a merged file whose
    unlink was lost; either way removing it is what deleting the snapshot means.
    """
    name = snapshot_file_name(state.volume_id, snapshot_id)
    path = state.path(name)
    if name in state.ledger.snapshots.values() or not os.path.lexists(path):
        return False
    names = state.names
    if name in names:
        index = names.index(name)
        if index == 0 or index == len(names) - 1:
            return False
        _commit_down(state, index, progress)
        _bypass(state, index)
    unlink_durable(path)
    return True
