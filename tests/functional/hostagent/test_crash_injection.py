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
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.recovery import CRASH_ENV
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from libvirt_ops import DiskSnapshotSpec, QuiescePolicy, SnapshotRequest, take_snapshot
from tests.functional.hostagent.test_agent_assisted import (
    PROJECT,
    ROOT,
    CinderRecorder,
    _chain,
    _check,
    _create,
    _delete,
    _final,
    _precreate,
)

pytestmark = pytest.mark.functional


class Bed:
    """One guest, one Cinder recorder and one agent identity for the whole module."""

    def __init__(self, guest: Any, share: Any, rabbit: Any, directory: Path) -> None:
        self.g, self.share, self.dir = guest, share, directory
        self.cinder = CinderRecorder()
        self.conf = directory / "agent.conf"
        self.conf.write_text(
            f"[DEFAULT]\nhost = crash-{uuid.uuid4().hex[:6]}\n"
            f"transport_url = {rabbit.transport_url}\nstate_path = {directory / 'state'}\n"
            "use_stderr = true\n"  # oslo.log: stdout carries only the READY line
            f"[shares]\nallowed_roots = {share.root}\n[agent]\nworkers = 2\nmerge_timeout = 60\n"
            f"[cinder]\nauth_type = noauth\nendpoint = {self.cinder.endpoint}\n"
            f"project_id = {PROJECT}\n"
        )
        self.host = self.conf.read_text().split("host = ")[1].split("\n")[0]
        self.transport = get_transport(make_conf(), rabbit.transport_url)
        self.log = directory / "agent.log"

    def start(self, crash_at: str | None) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        env["PYTHONWARNINGS"] = "ignore"
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        argv = [sys.executable, "-m", "hostagent.cli", "--config-file", str(self.conf)]
        proc = subprocess.Popen(
            [*argv, "--ready-line"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "a"),
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        deadline, line = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None and line.strip() != "READY":
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            pytest.fail("agent did not start: " + self.log.read_text()[-3000:])
        return proc

    def client(self, timeout: int) -> AgentAPI:
        return AgentAPI(self.transport, self.host, timeout=timeout)

    def snapshot_directly(self) -> tuple[str, str]:
        """A snapshot as an earlier, successful agent run would have left it."""
        snap = str(uuid.uuid4())
        name = _precreate(self.g, snap)
        spec = DiskSnapshotSpec(name, volume_id=self.g.disks[0].volume_id, reuse_existing=True)
        req = SnapshotRequest(self.g.dom.UUIDString(), (spec,), quiesce=QuiescePolicy.OFF)
        take_snapshot(self.g.conn, req, roots=[self.share.root])
        return snap, name

    def close(self) -> None:
        self.transport.cleanup()
        self.cinder.close()


def dir_share() -> Iterator[Any]:
    """The dir share only, overriding the session-wide dir/gluster parametrization.

    Recovery decides from the journal, the live XML and the file headers; none of that
    depends on the share kind, and both kinds are exercised by test_agent_assisted.py.
    One kind keeps the kill -9 cycles (two agent starts each) inside the CI budget.
    """
    from testbed.shares import DirShare

    s = DirShare()
    yield s
    s.close()


def open_bed(libvirt_host: Any, guest_image: Any, share: Any, rabbitmq: Any) -> Iterator[Bed]:
    """One single-disk guest + recorder + agent identity (a module fixture's body)."""
    from testbed import procs
    from testbed.guest import GuestFactory

    factory = GuestFactory(libvirt_host.connection, guest_image, lambda: share.new_dir("guest"))
    directory = procs.run_dir() / f"crash-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    b = Bed(factory(ndisks=1, share=share), share, rabbitmq, directory)
    try:
        yield b
    finally:
        b.close()
        factory.close()


@pytest.fixture(scope="module")
def share() -> Iterator[Any]:
    yield from dir_share()


@pytest.fixture(scope="module")
def bed(libvirt_host: Any, guest_image: Any, share: Any, rabbitmq: Any) -> Iterator[Bed]:
    yield from open_bed(libvirt_host, guest_image, share, rabbitmq)


def _crash_then_recover(bed: Bed, at: str, send: Any) -> api.Operation:
    """Send with the crash armed, see 137, restart clean, send again (Cinder's retry)."""
    from oslo_messaging import MessagingTimeout  # after hostagent chose its backend

    proc = bed.start(at)
    try:
        send(bed.client(timeout=5))
    except MessagingTimeout:
        pass  # the agent may die before its reply left: the retry below covers it
    try:
        assert proc.wait(timeout=60) == 137, bed.log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = bed.start(None)
    try:
        client = bed.client(timeout=30)
        op = _final(client, send(client), timeout=90)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, bed.log.read_text()[-3000:]
    return op


def _assert_converged(bed: Bed, extra: set[str]) -> list[str]:
    g = bed.g
    chain = _chain(g)
    for name in chain:
        _check(g.dir / name)
    files = {n for n in os.listdir(g.dir) if n.startswith("volume-")}
    assert files == set(chain) | extra, f"stray files on the share: {files - set(chain)}"
    assert g.agent("guest-fsfreeze-status") == "thawed"
    return chain


CREATE = [
    ("validate:planned", False),
    ("validate:done", False),
    ("snapshot:planned", False),
    ("snapshot:done", True),
    ("notify:planned", True),
    ("notify:done", True),
]


@pytest.mark.parametrize(("at", "taken"), CREATE)
def test_create_crash_converges(bed: Bed, at: str, taken: bool) -> None:
    g = bed.g
    before = _chain(g)
    merged = {n for n in os.listdir(g.dir) if n.startswith("volume-")} - set(before)
    snap = str(uuid.uuid4())
    name = _precreate(g, snap)
    op = _crash_then_recover(bed, at, lambda c: _create(c, g, snap, name))
    mine = [body for sid, body in bed.cinder.updates if sid == snap]
    if taken:
        assert op.state is api.OperationState.SUCCEEDED, op.error
        assert mine == [{"status": "creating", "progress": "90%"}]
        assert _assert_converged(bed, merged) == [name, *before]
    else:  # the snapshot did not happen before the kill: honest error, chain untouched
        assert op.state is api.OperationState.FAILED
        assert mine == [{"status": "error"}]
        assert _assert_converged(bed, merged | {name}) == before
        os.unlink(g.dir / name)  # Cinder's own overlay: Cinder removes it, not the agent


DELETE = [
    "validate:planned",
    "validate:done",
    "merge:planned",
    "merge:done",
    "notify:planned",
    "notify:done",
]


@pytest.mark.parametrize("at", DELETE)
def test_delete_crash_converges_to_deleting_90(bed: Bed, at: str) -> None:
    g = bed.g
    s1, f1 = bed.snapshot_directly()
    _s2, f2 = bed.snapshot_directly()
    before = _chain(g)
    assert before[:2] == [f2, f1]
    op = _crash_then_recover(bed, at, lambda c: _delete(c, g, s1, f1, before[2]))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    mine = [body for sid, body in bed.cinder.updates if sid == s1]
    assert mine == [{"status": "deleting", "progress": "90%"}]
    old = {n for n in os.listdir(g.dir) if n.startswith("volume-")} - set(before)
    assert _assert_converged(bed, old | {f1}) == [f2, *before[2:]]
    os.unlink(g.dir / f1)  # Cinder deletes the merged file itself
