"""kill -9 of a real ``qsnap-agent`` while it releases a backup checkpoint; the restart heals.

An incremental backup leaves ``volume-<vid>.qsnap-bk-<key>`` as the live top. An assisted
create (the releasing operation that needs no Cinder: ``[cinder] enabled = false``) first
merges it down with an active commit. With ``QSNAP_TEST_CRASH_AT=release_checkpoint:job``
the agent dies right after libvirt accepted that job, which libvirt keeps READY forever.
After each crash the agent is restarted and must leave: no block job on the disk, the
checkpoint out of the live chain and its file gone (or, killed before the job, still the
valid live top), live chain == the files' headers, the create failed as recovery says (the
snapshot was never taken: Cinder's retry then works), the guest still writing clean records,
and the next incremental backup falling back to a full read that says the checkpoint is gone.
Also ``:planned`` (release never started) and ``:done`` (released, killed before validate),
and an instance snapshot (agent-owned, resumed in the pool) killed mid-release.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI
from hostagent.rpc.messaging import messaging
from testbed.guest import GuestFactory
from testbed.shares import DirShare
from tests.functional.hostagent.backup.backup_agent import BackupAgent

pytestmark = [pytest.mark.functional, pytest.mark.timeout(900)]
CTX: dict[str, Any] = {"request_id": "req-crash-release"}


def _headers(path: Path) -> list[str]:
    """The chain as qemu-img reads the files' headers (pinned format, -U: in use)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--backing-chain", "--output=json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [os.path.basename(i["filename"]) for i in json.loads(out)]


def _backup(agent: BackupAgent, vid: str) -> dict[str, Any]:
    op = agent.wait(agent.api.create_backup(CTX, volume_ids=[vid], instance_uuid=None,
                                            incremental=True))  # fmt: skip
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (res,) = op.result["backups"]
    return dict(res)


def _create(agent: BackupAgent, g: Any, base: str, snap: str) -> tuple[str, dict[str, Any]]:
    """An assisted create as Cinder sends it: new_file pre-created on Cinder's active file."""
    new_file = f"volume-{g.disks[0].volume_id}.{snap}"
    path = Path(g.dir) / new_file
    if not path.exists():
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(path)],
            check=True,
        )
        os.chmod(path, 0o666)
    return new_file, {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}


def _send_and_die(agent: BackupAgent, vid: str, info: dict[str, Any]) -> None:
    quick = AgentAPI(agent.transport, agent.host, timeout=10)
    with contextlib.suppress(messaging().MessagingTimeout):  # died before its reply
        quick.create_assisted_snapshot(CTX, vid, info)
    agent.wait_died()


def _check_healed(g: Any, vid: str, base: str, overlay: str, records_before: int) -> None:
    dom = g.dom
    assert not dom.blockJobInfo(g.disks[0].target, 0), "a block job is left on the disk"
    assert g.chain(vid) == [base] == _headers(Path(g.dir) / base)
    assert not (Path(g.dir) / overlay).exists(), f"{overlay} left on the share"
    log = g.records(g.disks[0].mountpoint)
    assert log.clean and log.count > records_before, log.problems


def test_kill_during_release_heals_after_restart(
    dir_guests: GuestFactory, dir_share: DirShare, rabbitmq: Any, bed_dir: Path
) -> None:
    g, share = dir_guests(ndisks=1), dir_share
    vid = g.disks[0].volume_id
    base = g.chain(vid)[0]
    mnt = g.disks[0].mountpoint
    agent = BackupAgent(share.root, rabbitmq, bed_dir)
    try:
        g.start_writers(interval_ms=10)
        agent.start()
        first = _backup(agent, vid)
        k1 = first["checkpoint"]
        assert g.chain(vid) == [k1, base]
        agent.stop()

        # 1. killed with the release's active commit running: libvirt keeps it READY forever
        agent.start("release_checkpoint:job")
        snap = str(uuid.uuid4())
        new_file, info = _create(agent, g, base, snap)
        _send_and_die(agent, vid, info)
        job = g.dom.blockJobInfo(g.disks[0].target, 0)
        assert job and job["type"] == lo.JobType.ACTIVE_COMMIT, f"no job left: {job}"
        assert g.chain(vid)[0] == k1
        n0 = g.records(mnt).count
        agent.start()
        _check_healed(g, vid, base, k1, n0)
        op = agent.wait(agent.api.create_assisted_snapshot(CTX, vid, info))  # Cinder's retry
        assert op.state is api.OperationState.FAILED  # snapshot never taken: error to Cinder
        steps = {s["name"]: s for s in op.result["steps"]}
        rel = steps["release_checkpoint"]
        assert rel["state"] == "done" and rel["data"]["recovered"] is True
        assert rel["data"]["job"]["found"] == "ACTIVE_COMMIT" and rel["data"]["job"]["pivoted"]
        assert "snapshot" not in steps and new_file not in g.chain(vid)

        # 2. the next backup works and says the checkpoint is gone (full read, deduplicated)
        second = _backup(agent, vid)
        assert "no longer the live top" in (second["fallback_reason"] or ""), second
        k2 = second["checkpoint"]
        assert g.chain(vid) == [k2, base]
        agent.stop()

        # 3. killed right after journaling the release (nothing started): checkpoint kept
        agent.start("release_checkpoint:planned")
        _new2, info2 = _create(agent, g, base, str(uuid.uuid4()))
        _send_and_die(agent, vid, info2)
        agent.start()
        op = agent.wait(agent.api.create_assisted_snapshot(CTX, vid, info2))
        assert op.state is api.OperationState.FAILED
        rel = next(s for s in op.result["steps"] if s["name"] == "release_checkpoint")
        assert rel["state"] == "undone"
        assert g.chain(vid) == [k2, base] == _headers(Path(g.dir) / k2)
        assert not g.dom.blockJobInfo(g.disks[0].target, 0)
        agent.stop()

        # 4. killed right after the release was journaled done: chain already Cinder's
        agent.start("release_checkpoint:done")
        _new3, info3 = _create(agent, g, base, str(uuid.uuid4()))
        _send_and_die(agent, vid, info3)
        n1 = g.records(mnt).count
        agent.start()
        _check_healed(g, vid, base, k2, n1)
        op = agent.wait(agent.api.create_assisted_snapshot(CTX, vid, info3))
        assert op.state is api.OperationState.FAILED

        # 5. Cinder's retry with a new snapshot works on the healed chain
        new4, info4 = _create(agent, g, base, str(uuid.uuid4()))
        op = agent.wait(agent.api.create_assisted_snapshot(CTX, vid, info4))
        assert op.state is api.OperationState.SUCCEEDED, op.error
        assert g.chain(vid) == [new4, base] == _headers(Path(g.dir) / new4)
        third = _backup(agent, vid)
        assert third["checkpoint"] and "no longer the live top" in (third["fallback_reason"] or "")
        k3 = third["checkpoint"]
        assert g.chain(vid) == [k3, new4, base]
        agent.stop()

        # 6. an instance snapshot (agent-owned, resumed in the pool) killed mid-release
        agent.start("release_checkpoint:job")
        quick = AgentAPI(agent.transport, agent.host, timeout=10)
        with contextlib.suppress(messaging().MessagingTimeout):
            quick.snapshot_instance(CTX, g.uuid, [vid])
        agent.wait_died()
        assert g.dom.blockJobInfo(g.disks[0].target, 0), "the release's job must be left"
        n2 = g.records(mnt).count
        agent.start()
        kind = api.OperationFilters(kind=api.OperationKind.INSTANCE_SNAPSHOT)
        (iop,) = agent.api.list_operations(CTX, kind)
        iop = agent.wait(iop)
        assert iop.state is api.OperationState.FAILED  # never planned: no snapshot taken
        rel = next(s for s in iop.result["steps"] if s["name"] == "release_checkpoint")
        assert rel["state"] == "done" and rel["data"]["job"]["pivoted"] is True
        assert not g.dom.blockJobInfo(g.disks[0].target, 0)
        assert g.chain(vid) == [new4, base] == _headers(Path(g.dir) / new4)
        assert not (Path(g.dir) / k3).exists()
        assert not (Path(g.dir) / f"volume-{vid}.info").exists(), "no ledger for a failed one"
        # ... and the same request again succeeds; the agent's ledger matches the live chain
        iop = agent.wait(agent.api.snapshot_instance(CTX, g.uuid, [vid]))
        assert iop.state is api.OperationState.SUCCEEDED, iop.error
        top = g.chain(vid)[0]
        ledger = json.loads((Path(g.dir) / f"volume-{vid}.info").read_text())
        assert ledger["active"] == top and g.chain(vid) == [top, new4, base]
        assert _headers(Path(g.dir) / top) == [top, new4, base]
        g.stop_writers()
        log = g.records(mnt)
        assert log.clean and log.count > n2, log.problems
    finally:
        agent.close()
