"""kill -9 of a real ``qsnap-agent`` at every journaled step of an online backup; the
restarted agent converges by itself and the next backup cleans up after the killed one.

A backup is three journaled operations deep: the volume's backup (steps checkpoint, read,
drop_checkpoints), the checkpoint's take (an instance snapshot: plan, cinder_create,
overlays, snapshot, ledger, cinder_finalize) and one owned delete per older checkpoint
(validate, merge, ledger, remove, cinder_delete). ``QSNAP_TEST_CRASH_AT`` makes the agent
exit 137 right after the named journal write, each step at ``planned`` and ``done``
(``merge:job``: right after the delete's block job started). A step name the take and a
delete share (``ledger``) fires in the take, which comes first; the delete's ledger step is
reached through a user's delete of the kept checkpoint instead (an active commit of the
live top, also killed with its job running). The journal, read while the agent is dead,
must name the operation kind, step and phase the kill hit: a point that silently fired
elsewhere would test nothing.

One TCG guest writing records for the whole module, one agent identity (its log kept under
the run's directory); the volume always has a kept checkpoint when a point starts, so a
backup reaches its drops. After each kill a clean agent starts and every operation finishes
by itself (no request is retried); then: the hit operation ended as its journal allows
(snapshot taken or manifest published: succeeded, else failed) with no step left planned,
a job the killed agent started was adopted rather than run again, the guest is thawed and
still writing, the live top is the ledger's active, every layer is the base or a ledger
value and every ledger value a layer, the share holds no other file of the volume (no
``*.qsnap-bk-*``), no block job is left, ``qemu-img check`` passes on every layer (on the
live top, which the guest is writing, leaked clusters are tolerated); ONE more
incremental backup succeeds (incremental, or after a user's delete a full read naming the
deleted snapshot), drops every other checkpoint the ledger held and keeps exactly its own,
and its restore holds a clean prefix of the guest's records.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent.journal.model import OperationKind, OperationState, StepState
from hostagent.journal.store import Journal
from hostagent.rpc import contract as api
from hostagent.rpc.messaging import messaging
from testbed import procs
from testbed.agent import CTX
from testbed.disks import read_guest_file
from testbed.guest import GuestFactory
from testbed.records import parse_records
from testbed.shares import DirShare
from tests.functional.hostagent.backup.backup_agent import BackupAgent
from tests.functional.hostagent.backup.chains import assert_coherent, check_layers, recorded

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]
BACKUP, TAKE, DROP = (
    OperationKind.BACKUP,
    OperationKind.INSTANCE_SNAPSHOT,
    OperationKind.OWNED_DELETE,
)
OK, FAILED = OperationState.SUCCEEDED, OperationState.FAILED


@dataclass(frozen=True)
class Point:
    """A crash point, what sends the work there and what the kill must have hit."""

    at: str  # QSNAP_TEST_CRASH_AT
    hits: OperationKind  # the operation whose journal write was the last one
    ends: OperationState  # that operation's state once the restarted agent finished it
    published: bool = False  # the killed backup's manifest was written
    dropped: bool = False  # the kept checkpoint's delete had begun: recovery completes it
    user_delete: bool = False  # a user's delete of the kept checkpoint, not a backup

    def __str__(self) -> str:
        return f"{self.at}{'-user-delete' if self.user_delete else ''}"


def _dropping(at: str, hits: OperationKind = DROP) -> Point:
    """A point after the publish, the kept checkpoint's delete begun."""
    return Point(at, hits, OK, published=True, dropped=True)


def _user_delete(at: str) -> Point:
    """A user's delete of the kept checkpoint, the live top (active commit + pivot)."""
    return Point(at, DROP, OK, user_delete=True)


POINTS = [
    Point("checkpoint:planned", BACKUP, FAILED),
    # the checkpoint's take: failed (its overlay removed) unless the snapshot was taken
    Point("plan:planned", TAKE, FAILED),
    Point("plan:done", TAKE, FAILED),
    Point("cinder_create:planned", TAKE, FAILED),
    Point("cinder_create:done", TAKE, FAILED),
    Point("overlays:planned", TAKE, FAILED),
    Point("overlays:done", TAKE, FAILED),  # an overlay file no chain uses yet
    Point("snapshot:planned", TAKE, FAILED),
    Point("snapshot:done", TAKE, OK),  # a live layer not in the ledger yet
    Point("ledger:planned", TAKE, OK),
    Point("ledger:done", TAKE, OK),
    Point("cinder_finalize:planned", TAKE, OK),
    Point("cinder_finalize:done", TAKE, OK),
    Point("checkpoint:done", BACKUP, FAILED),  # taken and recorded, never read
    Point("read:planned", BACKUP, FAILED),
    Point("read:done", BACKUP, OK, published=True),
    Point("drop_checkpoints:planned", BACKUP, OK, published=True),
    # the drop of the previous checkpoint (an inner layer: a plain commit)
    _dropping("validate:planned"),
    _dropping("validate:done"),
    _dropping("merge:planned"),
    _dropping("merge:job"),
    _dropping("merge:done"),
    _dropping("remove:planned"),  # merged and unrecorded, still a file on the share
    _dropping("remove:done"),
    _dropping("cinder_delete:planned"),
    _dropping("cinder_delete:done"),
    _dropping("drop_checkpoints:done", BACKUP),
    _user_delete("merge:job"),  # libvirt keeps the active commit READY
    _user_delete("ledger:planned"),
    _user_delete("ledger:done"),
]


@dataclass(frozen=True)
class Hit:
    op_id: uuid.UUID
    kind: OperationKind
    step: str
    state: StepState


class Bed:
    """The module's guest (one volume, writing records), its agent and the checks."""

    def __init__(self, g: Any, agent: BackupAgent) -> None:
        self.g, self.agent = g, agent
        self.vid, self.dir = g.disks[0].volume_id, Path(g.dir)
        self.base = g.chain(self.vid)[-1]
        self.mnt, self.target = g.disks[0].mountpoint, g.disks[0].target

    def journal(self) -> Journal:
        return Journal(str(self.agent.state / "journal.sqlite"))

    def killed_at(self) -> Hit:
        """The newest journal write of the dead agent (the hit operation is unfinished)."""
        with self.journal() as j:
            steps = [(s, r.operation.kind) for r in j.unfinished() for s in r.steps]
        s, kind = max(steps, key=lambda sk: sk[0].updated_at)
        return Hit(s.op_id, kind, s.name, s.state)

    def settled(self, op_id: uuid.UUID, timeout: float = 300.0) -> OperationState:
        """Wait (bounded) until no operation is unfinished; the hit operation's state."""
        deadline = time.monotonic() + timeout
        with self.journal() as j:
            while left := j.unfinished():
                if time.monotonic() > deadline:  # a bound against hanging, not a timing check
                    raise TimeoutError(f"still unfinished: {left}\n{self.agent.tail()}")
                time.sleep(0.3)
            planned = [s for s in j.steps(op_id) if s.state is StepState.PLANNED]
            assert not planned, planned  # every step the kill left open was judged
            return j.get(op_id).state

    def merge_step(self, op_id: uuid.UUID) -> Any:
        """The delete's last merge step (a kill may have left an undone one before it)."""
        with self.journal() as j:
            return [s for s in j.steps(op_id) if s.name == "merge"][-1]

    def converged(self, records_before: int) -> dict[str, str]:
        """Coherent with the ledger, every layer checks clean, no job, guest thawed and
        writing; the ledger's snapshots."""
        g, chain = self.g, self.g.chain(self.vid)
        snaps = assert_coherent(self.dir, self.vid, chain, self.base)
        check_layers(self.dir, chain, g)
        assert not g.dom.blockJobInfo(self.target, 0), "a block job is left on the disk"
        assert g.agent("guest-fsfreeze-status") == "thawed"
        log = g.records(self.mnt)
        assert log.clean and log.count > records_before, log.problems
        return snaps

    def backup_once(self, full_because: str | None) -> dict[str, Any]:
        """One incremental request: it drops every other checkpoint the ledger holds and
        keeps exactly its own; its restore is a clean prefix of the guest's records."""
        a, before = self.agent.api, recorded(self.dir, self.vid)
        op = self.agent.wait(
            a.create_backup(CTX, volume_ids=[self.vid], instance_uuid=None, incremental=True)
        )
        assert op.state is api.OperationState.SUCCEEDED, (op.error, self.agent.tail())
        (res,) = op.result["backups"]
        if full_because is None:
            assert res["incremental"] and res["fallback_reason"] is None, res
        else:
            assert not res["incremental"] and full_because in (res["fallback_reason"] or "")
        assert sorted(res["dropped"]) == sorted(before), (res, before)
        assert self.g.chain(self.vid) == [res["checkpoint_file"], self.base]
        snaps = assert_coherent(self.dir, self.vid, self.g.chain(self.vid), self.base)
        assert snaps == {res["checkpoint"]: res["checkpoint_file"]}
        out = self.dir / f"restored-{uuid.uuid4().hex[:8]}.raw"
        try:
            rop = self.agent.wait(
                a.restore_backup(CTX, res["backup_id"], to_path=str(out), volume_id=None, fmt="raw")
            )
            assert rop.state is api.OperationState.SUCCEEDED, rop.error
            log = parse_records(read_guest_file(out, "raw", "/records"))
            assert log.clean and log.count > 0, log.problems
            assert log.is_prefix_of(self.g.records(self.mnt))
        finally:
            out.unlink(missing_ok=True)
        return dict(res)


@pytest.fixture(scope="module")
def bed(dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any) -> Iterator[Bed]:
    """One guest and one agent identity (its log kept under the run's directory)."""
    work = procs.run_dir() / f"bk-crash-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o755)
    agent = BackupAgent(dir_share.root, rabbitmq, work)
    try:
        b = Bed(dir_guests(ndisks=1, size_mib=128), agent)
        b.g.start_writers(interval_ms=10)
        agent.start(timeout=60)
        b.backup_once("no previous backup")  # the kept checkpoint every point starts from
        yield b
    finally:
        agent.close()


@pytest.mark.parametrize("point", POINTS, ids=str)
def test_kill_at_step_converges(bed: Bed, point: Point) -> None:
    g, agent, vid = bed.g, bed.agent, bed.vid
    (kept,) = recorded(bed.dir, vid)  # the previous backup's checkpoint
    n_backups = len(agent.api.list_backups(CTX, vid))
    records_before = g.records(bed.mnt).count
    agent.stop()
    agent.start(point.at, timeout=60)
    quick = agent.client(timeout=10)
    with contextlib.suppress(messaging().MessagingTimeout):  # died before its reply
        if point.user_delete:
            quick.delete_snapshot(CTX, vid, kept)
        else:
            quick.create_backup(CTX, volume_ids=[vid], instance_uuid=None, incremental=True)
    agent.wait_died(120)
    hit = bed.killed_at()
    step, phase = point.at.split(":")
    state = StepState.DONE if phase == "done" else StepState.PLANNED
    assert (hit.kind, hit.step, hit.state) == (point.hits, step, state), hit
    if point.user_delete and phase == "job":  # libvirt keeps an active commit READY
        assert g.dom.blockJobInfo(bed.target, 0), "the delete's active commit is not left"

    agent.start(timeout=60)
    assert bed.settled(hit.op_id) is point.ends, agent.tail()
    snaps = bed.converged(records_before)
    if phase == "job":  # the job the killed agent started was adopted, not started again
        merge = bed.merge_step(hit.op_id)
        assert merge.state is StepState.DONE and merge.data.get("recovered") is True, merge
    assert len(agent.api.list_backups(CTX, vid)) == n_backups + point.published
    if point.user_delete:  # the user's delete completed: Cinder's chain back, id forgotten
        assert snaps == {} and g.chain(vid) == [bed.base]
        res = bed.backup_once(full_because=kept)
    else:  # the kept checkpoint is gone only if its drop had begun (recovery ends it)
        assert (kept in snaps) is not point.dropped, snaps
        res = bed.backup_once(full_because=None)
    assert res["checkpoint"] not in (kept, *snaps)
