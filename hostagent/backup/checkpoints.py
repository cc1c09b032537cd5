"""Backup checkpoint overlays as the other operations see them: stripped, then released.

An incremental backup leaves ``volume-<vid>.qsnap-bk-<key>`` as the live top, above the
active file Cinder's ``.info`` names. Cinder computes ``new_file``'s backing file and a
delete's ``file_to_merge`` from its ledger, so every snapshot operation validates against
the chain WITHOUT the checkpoint (:func:`cinder_chain`) and, as its first journaled step,
merges the checkpoint down (:func:`release_step`): the chain is then what Cinder believes.
The next backup of that volume falls back to a full read with dedup and says so.

A kill -9 during the release leaves an ACTIVE COMMIT in libvirt that never ends by itself
(READY until pivoted), the overlay as live top and the step PLANNED: after a restart
:func:`recover_release` settles the job (pivots it: the release's intent), removes the
overlay once it left the live chain, and journals the step, before the operation's own
recovery decides the rest from a clean chain.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from hostagent.backup.online import BACKUP_NAMING, is_backup_overlay, overlay_volume
from hostagent.hypervisor import Located, chain_names
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.crash import StepFn
from hostagent.journal.model import StepName
from hostagent.rpc import contract as api

LOG = logging.getLogger(__name__)

#: Merge a volume's checkpoint overlay down (active commit + pivot, unlink); its name or None.
Release = Callable[[Located], "str | None"]
#: Bring the disk's block job (one a dead agent left) to its end within a timeout; what it did.
Settle = Callable[[Located, float], "dict[str, Any]"]


def checkpoint_of(where: Located) -> str | None:
    """The checkpoint overlay that is the disk's live top, if any."""
    top = os.path.basename(where.disk.source)
    return top if is_backup_overlay(top, str(where.disk.serial or "").lower()) else None


def cinder_chain(where: Located, roots: list[str], *, releasable: bool) -> list[str]:
    """The chain's names top first as Cinder knows it: a checkpoint top left out.

    The whole chain (checkpoint included) is inspected and must match libvirt's view. A
    checkpoint is accepted only if the caller can release it (``releasable``); otherwise
    the request is refused (acting above it would hide the operation from Cinder's ledger).
    """
    checkpoint = checkpoint_of(where)
    if checkpoint is None:
        return chain_names(where, roots)
    if not releasable:
        raise api.InvalidRequest(
            f"the live top of {where.disk.target} is the backup checkpoint {checkpoint} and "
            "this agent has no backup engine to release it"
        )
    names = chain_names(where, roots, naming=BACKUP_NAMING)
    serial = str(where.disk.serial).lower()
    if len(names) < 2 or any(is_backup_overlay(n, serial) for n in names[1:]):
        raise api.InvalidRequest(f"checkpoint {checkpoint} is not directly above Cinder's file")
    return names[1:]


def release_step(
    step: StepFn, op_id: uuid.UUID, where: Located, release: Release | None
) -> Located | None:
    """Journal and take the release of ``where``'s checkpoint, if it has one.

    Returns None when there was nothing to release (``where`` still holds), else the caller
    must locate the disk again (its chain changed).
    """
    checkpoint = checkpoint_of(where)
    if checkpoint is None or release is None:
        return where
    with step(op_id, StepName.RELEASE_CHECKPOINT, {"overlay": checkpoint, "disk": where.key}) as h:
        h.data["released"] = release(where)
    return None


def recover_release(
    journal: jn.Journal,
    op_id: uuid.UUID,
    steps: Sequence[ops.Step],
    locate: Callable[[str], Located],
    settle: Settle,
    roots: list[str],
    timeout: float,
) -> list[str]:
    """After a restart: finish every PLANNED ``release_checkpoint`` step of ``op_id``.

    The disk's job is settled (an interrupted active commit is pivoted: the release's
    intent); an overlay that left the live chain is unlinked (never one still in it) and
    the step is DONE (recovered); an overlay still live means the release never took
    effect: the step is UNDONE and the checkpoint stays valid. Returns what was decided.
    Raises (settle timeout, unreadable chain): the operation stays for the next start.
    """
    out: list[str] = []
    for s in steps:
        if s.name != StepName.RELEASE_CHECKPOINT or s.state is not ops.StepState.PLANNED:
            continue
        overlay = str(s.data.get("overlay", ""))
        vid = overlay_volume(overlay)
        if vid is None:
            journal.step_undone(op_id, s.seq, {"recovery": f"{overlay!r}: no checkpoint name"})
            out.append(f"release of {overlay!r} ignored: not a checkpoint name")
            continue
        try:
            where = locate(vid)
        except api.AgentRpcError as exc:
            journal.step_undone(op_id, s.seq, {"recovery": f"volume not here: {exc}"})
            out.append(f"release of {overlay} left: volume {vid} not attached here")
            continue
        job = settle(where, timeout)
        where = locate(vid)
        names = chain_names(where, roots, naming=BACKUP_NAMING)
        if overlay in names:
            why = {"recovery": "checkpoint still in the live chain: never released", "job": job}
            journal.step_undone(op_id, s.seq, why)
            out.append(f"{overlay} still live: release never took effect")
            continue
        path = os.path.join(os.path.dirname(where.disk.source), overlay)
        removed = os.path.isfile(path) and not os.path.islink(path)
        if removed:
            os.unlink(path)
        data = {"recovered": True, "released": overlay, "removed": removed, "job": job}
        journal.step_done(op_id, s.seq, {**data, "chain": names})
        LOG.warning("op %s: checkpoint %s released after restart (job %s)", op_id, overlay, job)
        out.append(f"released {overlay} after restart (job {job})")
    return out


def has_planned_release(steps: Sequence[ops.Step]) -> bool:
    return any(
        s.name == StepName.RELEASE_CHECKPOINT and s.state is ops.StepState.PLANNED for s in steps
    )
