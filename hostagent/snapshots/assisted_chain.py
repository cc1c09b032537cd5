"""The live chain as the judge of an assisted operation whose call raised or was cut short.

A snapshot or merge call that raised may nevertheless have taken effect (QEMU switched, or
the block job ended, before the waiter failed). The fresh run and recovery decide alike:
from the disk's live chain (libvirt's view AND the file headers, which must agree), never
from the exception alone, so Cinder is told what is true.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hostagent.hypervisor import Hypervisor, Located
from hostagent.rpc import contract as api
from qcow2 import CINDER, Qcow2Error, inspect_chain

LOG = logging.getLogger(__name__)


def live_names(where: Located, roots: list[str]) -> list[str]:
    """The disk's chain, top first, from libvirt AND the file headers (must agree)."""
    disk = where.disk
    live = [os.path.realpath(layer.path) for layer in disk.chain]
    with inspect_chain(disk.source, roots=roots, naming=CINDER, fmt=disk.fmt) as c:
        on_disk = [os.path.realpath(info.path) for info in c.layers]
    if live != on_disk:
        raise Qcow2Error(f"libvirt's chain {live} differs from the files {on_disk}")
    return [os.path.basename(p) for p in live]


def expected_after(before: list[str], req: api.DeleteSnapshotRequest) -> list[str]:
    """The chain (basenames, top first) a successful merge of ``req`` leaves."""
    if req.merge_target_file is not None:
        assert req.file_to_merge is not None
        top, base = before.index(req.file_to_merge), before.index(req.merge_target_file)
        return before[:top] + before[base:]
    if req.file_to_merge is None:
        return before[:1]
    return before[:1] + before[before.index(req.file_to_merge) :]


def _live(hv: Hypervisor, roots: list[str], volume_id: str) -> tuple[Located, list[str]]:
    where = hv.locate(volume_id)
    return where, live_names(where, roots)


def judge_create(
    hv: Hypervisor, roots: list[str], req: api.CreateSnapshotRequest, exc: Exception
) -> dict[str, Any] | None:
    """After the snapshot call raised ``exc``: the step's data if ``new_file`` IS the live top
    nevertheless (the snapshot was taken), else None (not taken, or the chain is unknown:
    then the failure stands, as recovery decides)."""
    try:
        _where, names = _live(hv, roots, req.volume_id)
    except Exception as why:  # unknown: never guessed as taken
        LOG.warning("create %s: live chain unknown after %s: %s", req.snapshot_id, exc, why)
        return None
    if names[0] != req.new_file:
        return None
    LOG.warning("create %s raised (%s) but %s is the live top", req.snapshot_id, exc, names[0])
    return {
        "judged_from_live_chain": True,
        "raised": f"{type(exc).__name__}: {exc}",
        "chain": names,
    }


def judge_delete(
    hv: Hypervisor,
    roots: list[str],
    req: api.DeleteSnapshotRequest,
    before: list[str],
    exc: Exception,
) -> dict[str, Any] | None:
    """After the merge call raised ``exc``: the merge's result if the live chain IS the
    expected post-merge chain nevertheless (the job ended), else None."""
    try:
        where, names = _live(hv, roots, req.volume_id)
    except Exception as why:
        LOG.warning("delete %s: live chain unknown after %s: %s", req.snapshot_id, exc, why)
        return None
    if names != expected_after(before, req):
        return None
    LOG.warning("delete %s raised (%s) but the chain is merged: %s", req.snapshot_id, exc, names)
    return {
        "judged_from_live_chain": True,
        "raised": f"{type(exc).__name__}: {exc}",
        "chain_after": [os.path.join(os.path.dirname(where.disk.source), n) for n in names],
        "merged_away": [n for n in before if n not in names],
    }
