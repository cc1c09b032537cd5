"""Assisted snapshots as Cinder asks for them, against a real ``qsnap-agent`` whose Cinder
is a ``CinderRecorder``; and the crash bed of the kill -9 modules (one guest, one recorder
and one agent identity per module, the agent killed by an armed crash point and restarted).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI
from libvirt_ops import DiskSnapshotSpec, QuiescePolicy, SnapshotRequest, take_snapshot
from qcow2 import Ledger, write_ledger
from testbed import procs
from testbed.agent import CTX, AgentProcess, final, noauth_cinder
from testbed.cinder import CinderRecorder
from testbed.guest import GuestFactory
from testbed.layers import qemu_img_check

# the crash points of an assisted delete, in the order the agent journals them
DELETE_STEPS = [f"{s}:{p}" for s in ("validate", "merge", "notify") for p in ("planned", "done")]


def assisted_agent(
    work: Path, rabbit: Any, share: Any, cinder: CinderRecorder, *, prefix: str, merge_timeout: int
) -> AgentProcess:
    return AgentProcess(
        work, rabbit.transport_url, share.root, prefix=prefix,
        conf={
            "DEFAULT": {"use_stderr": "true"},  # oslo.log: stdout carries only the READY line
            "agent": {"workers": 2, "merge_timeout": merge_timeout},
            "cinder": noauth_cinder(cinder),
        },
    )  # fmt: skip


def precreate(g: Any, snap: str) -> str:
    """Exactly Cinder's online create: relative backing = the current top's basename."""
    top = g.chain()[0]
    name = f"volume-{g.disks[0].volume_id}.{snap}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top,
         str(g.dir / name)],
        check=True,
    )  # fmt: skip
    return name


def cinder_ledger(g: Any) -> None:
    """Cinder's ``.info`` as Cinder leaves it after its creates and commit deletes (it
    writes it once it heard ``90%``; the agent refuses a delete whose id is not in it):
    ``active`` = the live top, each ``volume-<vid>.<snapshot id>`` layer mapped to its id.
    Every layer of the live chain is one Cinder names (a backup's checkpoint included: it is
    a recorded snapshot), so the chain itself is the ledger."""
    vid = g.disks[0].volume_id
    names = g.chain()
    prefix = f"volume-{vid}."
    snaps = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
    write_ledger(str(g.dir), vid, Ledger(names[0], snaps))


def create(client: AgentAPI, g: Any, snap: str, new_file: str) -> api.Operation:
    info = {"snapshot_id": snap, "type": "qcow2", "new_file": new_file}
    return client.create_assisted_snapshot(CTX, g.disks[0].volume_id, info)


def delete(client: AgentAPI, g: Any, snap: str, to_merge: str | None, target: str | None) -> Any:
    info = {"type": "qcow2", "file_to_merge": to_merge, "merge_target_file": target}
    return client.delete_assisted_snapshot(CTX, g.disks[0].volume_id, snap, info)


class CrashBed:
    """One single-disk guest, one Cinder recorder and one agent identity for a module."""

    def __init__(self, guest: Any, share: Any, rabbit: Any, directory: Path) -> None:
        self.g, self.share = guest, share
        self.cinder = CinderRecorder()
        self.agent = assisted_agent(
            directory, rabbit, share, self.cinder, prefix="crash", merge_timeout=60
        )

    def snapshot_directly(self) -> tuple[str, str]:
        """A snapshot as an earlier, successful agent run would have left it."""
        snap = str(uuid.uuid4())
        name = precreate(self.g, snap)
        spec = DiskSnapshotSpec(name, volume_id=self.g.disks[0].volume_id, reuse_existing=True)
        req = SnapshotRequest(self.g.dom.UUIDString(), (spec,), quiesce=QuiescePolicy.OFF)
        take_snapshot(self.g.conn, req, roots=[self.share.root])
        cinder_ledger(self.g)  # as Cinder's ledger has it after its create
        return snap, name

    def crash_then_recover(self, at: str, send: Callable[[AgentAPI], Any]) -> api.Operation:
        """Send with the crash armed, see 137, restart clean, send again (Cinder's retry)."""
        from oslo_messaging import MessagingTimeout  # after hostagent chose its backend

        self.agent.start(at, timeout=60)
        try:
            send(self.agent.client(timeout=5))
        except MessagingTimeout:
            pass  # the agent may die before its reply left: the retry below covers it
        except BaseException:  # refused or broken: the armed agent never dies; stop it
            self.agent.stop()
            raise
        self.agent.wait_died(60)
        self.agent.start(timeout=60)
        try:
            client = self.agent.client(timeout=30)
            op = final(client, send(client), timeout=90)
        finally:
            rc = self.agent.stop()
        assert rc == 0, self.agent.tail()
        return op

    def converged(self, extra: set[str]) -> list[str]:
        """Every layer checks clean, no file but the chain and ``extra``, a thawed guest."""
        g = self.g
        chain: list[str] = g.chain()
        for name in chain:
            qemu_img_check(g.dir / name)
        files = {n for n in os.listdir(g.dir) if n.startswith("volume-")}
        assert files == set(chain) | extra, f"stray files on the share: {files - set(chain)}"
        assert g.agent("guest-fsfreeze-status") == "thawed"
        return chain

    def close(self) -> None:
        self.agent.close()
        self.cinder.close()


def open_crash_bed(guests: GuestFactory, share: Any, rabbit: Any) -> Iterator[CrashBed]:
    """A module fixture's body: the bed on a guest from ``guests`` (on ``share``)."""
    directory = procs.run_dir() / f"crash-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    b = CrashBed(guests(ndisks=1), share, rabbit, directory)
    try:
        yield b
    finally:
        b.close()
