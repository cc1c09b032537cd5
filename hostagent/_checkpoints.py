"""Backup checkpoint overlays as the other operations see them: stripped, then released.

An incremental backup leaves ``volume-<vid>.qsnap-bk-<key>`` as the live top, above the
active file Cinder's ``.info`` names. Cinder computes ``new_file``'s backing file and a
delete's ``file_to_merge`` from its ledger, so every snapshot operation validates against
the chain WITHOUT the checkpoint (:func:`cinder_chain`) and, as its first journaled step,
merges the checkpoint down (:func:`release_step`): the chain is then what Cinder believes.
The next backup of that volume falls back to a full read with dedup and says so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from hostagent import journal as jn
from hostagent import service_api as api
from hostagent._located import Located, chain_names
from hostagent.backup.online import BACKUP_NAMING, is_backup_overlay

#: Merge a volume's checkpoint overlay down (active commit + pivot, unlink); its name or None.
Release = Callable[[Located], "str | None"]
StepFn = Callable[[uuid.UUID, str, "dict[str, Any] | None"], AbstractContextManager[jn.StepHandle]]


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
    with step(op_id, "release_checkpoint", {"overlay": checkpoint, "disk": where.key}) as h:
        h.data["released"] = release(where)
    return None
