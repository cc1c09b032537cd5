"""kill -9 the real ``qsnap-agent`` after every delete step, for Cinder's pull and flatten.

test_crash_injection.py covers the commit delete (``merge_target_file`` set). Cinder's
delete of its NEWEST snapshot sends the two other kinds, which recovery handles on their own
paths (``expected_after`` and the ``pull``/``flatten`` verbs of the re-run merge):

- pull: ``file_to_merge`` = the base's backing file, ``merge_target_file`` = None; the base
  (Cinder's ``base_file``) leaves the chain, its data pulled into the active file;
- flatten: both None (the base is the volume's own file); the chain becomes the active file.

Each case kills the agent right after one journal write (planned or done of validate, merge,
notify), restarts it, sends Cinder's retry and requires ``deleting``/``90%`` exactly once,
the expected live chain, ``qemu-img check`` of every layer, no stray file, a thawed guest
and the guest's file written into the merged-away layer still readable after a cache drop.
One guest for the module; the chain of one case is the start of the next.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent.rpc import contract as api
from qcow2 import Ledger, write_ledger
from testbed.guest import GuestFactory
from testbed.shares import DirShare
from tests.functional.hostagent.agent_bed import DELETE_STEPS, CrashBed, delete, open_crash_bed

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def bed(dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any) -> Iterator[CrashBed]:
    yield from open_crash_bed(dir_guests, dir_share, rabbitmq)


def _write_into_top(bed: CrashBed, tag: str) -> tuple[str, str]:
    """A synced guest file: its blocks land in the current top (the layer merged next)."""
    path = f"/data/{tag}-{uuid.uuid4().hex[:6]}"
    data = os.urandom(96 * 1024)
    bed.g.write_file(path, data)
    bed.g.check(["sync"])
    return path, hashlib.sha256(data).hexdigest()


def _files(bed: CrashBed) -> set[str]:
    return {n for n in os.listdir(bed.g.dir) if n.startswith("volume-")}


def _converged_delete(bed: CrashBed, at: str, sid: str, info: tuple[str | None, None]) -> None:
    op = bed.crash_then_recover(at, lambda c: delete(c, bed.g, sid, *info))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    mine = [body for s, body in bed.cinder.updates if s == sid]
    assert mine == [{"status": "deleting", "progress": "90%"}]


@pytest.mark.parametrize("at", DELETE_STEPS)
def test_pull_crash_converges(bed: CrashBed, at: str) -> None:
    """Cinder deletes its newest snapshot s2 (active f2, base f1 = s1's file): pull f1."""
    g = bed.g
    _s1, f1 = bed.snapshot_directly()
    path, digest = _write_into_top(bed, "pull")  # into f1: only the pull keeps it
    s2, f2 = bed.snapshot_directly()
    before = g.chain()
    assert before[:2] == [f2, f1] and len(before) >= 3
    stale = _files(bed) - set(before)
    _converged_delete(bed, at, s2, (before[2], None))
    assert bed.converged(stale | {f1}) == [f2, *before[2:]]
    assert g.sha256(path) == digest
    os.unlink(g.dir / f1)  # Cinder deletes base_file itself


@pytest.mark.parametrize("at", DELETE_STEPS)
def test_flatten_crash_converges(bed: CrashBed, at: str) -> None:
    """Cinder deletes the only snapshot above the volume file: flatten into the active."""
    g = bed.g
    path, digest = _write_into_top(bed, "flat")  # into the layer(s) flattened away
    s1, f1 = bed.snapshot_directly()
    before = g.chain()
    assert before[0] == f1 and len(before) >= 2
    # Cinder's ledger: s1 is the only snapshot; the layers below are the volume's own (the
    # earlier cases' snapshots are deleted), so Cinder sends a flatten (base_id None)
    write_ledger(str(g.dir), g.disks[0].volume_id, Ledger(f1, {s1: f1}))
    stale = _files(bed) - set(before)
    _converged_delete(bed, at, s1, (None, None))
    assert bed.converged(stale | set(before[1:])) == [f1]
    assert g.sha256(path) == digest
    for name in before[1:]:  # Cinder deletes the old base itself
        os.unlink(g.dir / name)
