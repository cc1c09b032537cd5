"""kill -9 the real ``qsnap-agent`` right after every journaled step; the restart converges.

For each step of assisted create (validate/snapshot/notify) and delete (validate/merge/
notify), at PLANNED and at DONE, the agent runs with ``QSNAP_TEST_CRASH_AT`` and dies with
137 right after that journal write; it is restarted without it, Cinder's retry (same
snapshot id) is sent, and the operation must reach the right final state: the
CinderRecorder's reports for the snapshot, the live chain, ``qemu-img check`` of every
layer, no stray file on the share, and a thawed guest. One guest per share for the module.
Create before the snapshot took effect is reported ``error`` (recovery never takes a late
snapshot); every delete converges to ``deleting``/``90%`` (the merge is re-run if needed).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent.rpc import contract as api
from testbed.guest import GuestFactory
from testbed.shares import DirShare
from tests.functional.hostagent.agent_bed import (
    DELETE_STEPS,
    CrashBed,
    create,
    delete,
    open_crash_bed,
    precreate,
)

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def bed(dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any) -> Iterator[CrashBed]:
    """The dir share only: recovery decides from the journal, the live XML and the file
    headers, none of which depends on the share kind (both kinds run in
    test_agent_assisted.py); one kind keeps the kill -9 cycles inside the CI budget."""
    yield from open_crash_bed(dir_guests, dir_share, rabbitmq)


CREATE = [
    ("validate:planned", False),
    ("validate:done", False),
    ("snapshot:planned", False),
    ("snapshot:done", True),
    ("notify:planned", True),
    ("notify:done", True),
]


@pytest.mark.parametrize(("at", "taken"), CREATE)
def test_create_crash_converges(bed: CrashBed, at: str, taken: bool) -> None:
    g = bed.g
    before = g.chain()
    merged = {n for n in os.listdir(g.dir) if n.startswith("volume-")} - set(before)
    snap = str(uuid.uuid4())
    name = precreate(g, snap)
    op = bed.crash_then_recover(at, lambda c: create(c, g, snap, name))
    mine = [body for sid, body in bed.cinder.updates if sid == snap]
    if taken:
        assert op.state is api.OperationState.SUCCEEDED, op.error
        assert mine == [{"status": "creating", "progress": "90%"}]
        assert bed.converged(merged) == [name, *before]
    else:  # the snapshot did not happen before the kill: honest error, chain untouched
        assert op.state is api.OperationState.FAILED
        assert mine == [{"status": "error"}]
        assert bed.converged(merged | {name}) == before
        os.unlink(g.dir / name)  # Cinder's own overlay: Cinder removes it, not the agent


@pytest.mark.parametrize("at", DELETE_STEPS)
def test_delete_crash_converges_to_deleting_90(bed: CrashBed, at: str) -> None:
    g = bed.g
    s1, f1 = bed.snapshot_directly()
    _s2, f2 = bed.snapshot_directly()
    before = g.chain()
    assert before[:2] == [f2, f1]
    op = bed.crash_then_recover(at, lambda c: delete(c, g, s1, f1, before[2]))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    mine = [body for sid, body in bed.cinder.updates if sid == s1]
    assert mine == [{"status": "deleting", "progress": "90%"}]
    old = {n for n in os.listdir(g.dir) if n.startswith("volume-")} - set(before)
    assert bed.converged(old | {f1}) == [f2, *before[2:]]
    os.unlink(g.dir / f1)  # Cinder deletes the merged file itself
