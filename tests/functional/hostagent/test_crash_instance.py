"""kill -9 the real agent right after every journaled step of an instance snapshot and of
an agent-owned delete; the restarted agent converges.

Same peers as test_instance_snapshot.py (real Cinder 29 with qsnap's extension, three
attached volumes, one TCG guest for the module, the agent over RabbitMQ). For each step at
PLANNED and at DONE the agent runs with ``QSNAP_TEST_CRASH_AT`` and exits 137 right after
that journal write; a clean agent is started, and the operation must end in its one right
state: Cinder's record final (``available``, or ``error``/absent when the snapshot was not
taken; absent after a delete), no orphan overlay, ``qemu-img check`` clean, each ledger
matching its chain, the guest thawed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent.rpc import contract as api
from testbed.agent import CTX, final
from testbed.shares import DirShare
from tests.functional.hostagent.instance_bed import InstanceBed

pytestmark = pytest.mark.functional

INSTANCE = ["plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize"]
DELETE = ["validate", "merge", "ledger", "remove", "cinder_delete"]


class CrashBed:
    """The module's bed plus what each volume should hold (live snapshots, oldest first)."""

    def __init__(self, bed: InstanceBed) -> None:
        self.b = bed
        self.live: dict[str, list[str]] = {v: [] for v in bed.vols}

    def crash_then_recover(
        self, at: str, send: Any, kind: api.OperationKind, retry: bool
    ) -> api.Operation:
        """Stop the clean agent, start one armed at ``at``, send, see 137, restart clean.

        The agent may die before its reply leaves: then the operation is found again by a
        retry (owned deletes are idempotent by snapshot id) or as the newest of its kind.
        """
        from oslo_messaging import MessagingTimeout  # after hostagent chose its backend

        self.b.stop()
        self.b.start(at)
        op: api.Operation | None = None
        try:
            op = send(self.b.client(timeout=10))
        except MessagingTimeout:
            pass
        self.b.agent.wait_died(120)
        self.b.start()
        client = self.b.client()
        if op is None and retry:
            op = send(client)
        elif op is None:
            op = client.list_operations(CTX, api.OperationFilters(kind=kind))[0]  # newest
        return final(client, op, timeout=120)

    def converged(self) -> None:
        for vid, snaps in self.live.items():
            self.b.check(vid, snaps)
            for sid in snaps:
                assert self.b.status(sid) == ("available", vid)
        self.b.no_strays()
        assert self.b.guest.agent("guest-fsfreeze-status") == "thawed"


@pytest.fixture(scope="module")
def cbed(
    dir_share: DirShare, rabbitmq: Any, libvirt_host: Any, guest_image: Any
) -> Iterator[CrashBed]:
    b = InstanceBed(dir_share, rabbitmq, libvirt_host.connection, guest_image)
    try:
        b.start()
        yield CrashBed(b)
    finally:
        b.close()


def _planned_ids(c: CrashBed, op: api.Operation) -> list[str]:
    plan = [s for s in op.result["steps"] if s["name"] == "plan" and s["state"] == "done"]
    return [v["snapshot_id"] for v in plan[0]["data"]["volumes"]] if plan else []


@pytest.mark.parametrize("at", [f"{s}:{p}" for s in INSTANCE for p in ("planned", "done")])
def test_instance_snapshot_crash_converges(cbed: CrashBed, at: str) -> None:
    b, vols = cbed.b, cbed.b.vols[:2]
    op = cbed.crash_then_recover(
        at,
        lambda c: c.snapshot_instance(CTX, b.guest.uuid, vols, api.Quiesce.PREFERRED),
        api.OperationKind.INSTANCE_SNAPSHOT,
        retry=False,
    )
    sids = _planned_ids(cbed, op)
    step = at.split(":")[0]
    taken = INSTANCE.index(step) > INSTANCE.index("snapshot") or at == "snapshot:done"
    if taken:
        assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
        assert [s["snapshot_id"] for s in op.result["snapshots"]] == sids
        for vid, sid in zip(vols, sids, strict=True):
            cbed.live[vid].append(sid)
    else:
        assert op.state is api.OperationState.FAILED, op.result
        for sid in sids:  # never recorded, or recorded and failed: never left 'creating'
            assert b.status(sid) in (None, ("error", vols[sids.index(sid)]))
    cbed.converged()


@pytest.mark.parametrize("at", [f"{s}:{p}" for s in DELETE for p in ("planned", "done")])
def test_owned_delete_crash_converges(cbed: CrashBed, at: str) -> None:
    b, vid = cbed.b, cbed.b.vols[2]
    while len(cbed.live[vid]) < 2:  # two snapshots to choose from, taken by the clean agent
        c = b.client()
        op = final(c, c.snapshot_instance(CTX, b.guest.uuid, [vid], api.Quiesce.NONE), 120)
        assert op.state is api.OperationState.SUCCEEDED, op.error
        cbed.live[vid].append(op.result["snapshots"][0]["snapshot_id"])
    # alternate the newest (active commit + pivot) and an inner one (commit)
    newest = DELETE.index(at.split(":")[0]) % 2 == 0
    sid = cbed.live[vid][-1 if newest else 0]
    op = cbed.crash_then_recover(
        at, lambda c: c.delete_snapshot(CTX, vid, sid), api.OperationKind.DELETE_OWNED, retry=True
    )
    assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
    assert op.result["kind"] == ("active-commit" if newest else "commit")
    cbed.live[vid].remove(sid)
    assert b.status(sid) is None
    cbed.converged()


def test_no_operation_left_unfinished(cbed: CrashBed) -> None:
    client = cbed.b.client()
    deadline = time.monotonic() + 30
    while True:
        busy = [
            op
            for op in client.list_operations(CTX)
            if op.state in (api.OperationState.QUEUED, api.OperationState.RUNNING)
        ]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert busy == []
    with pytest.raises(api.SnapshotNotFound):  # and the typed refusal still holds
        client.delete_snapshot(CTX, cbed.b.vols[0], str(uuid.uuid4()))
