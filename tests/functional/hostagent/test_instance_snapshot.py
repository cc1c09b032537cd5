"""Instance snapshots and agent-owned deletes, end to end with real peers.

A real Cinder 29 (PyPI, qsnap's extension loaded) owns three volumes whose files on a plain
directory share are the three disks of one TCG guest, attached through the attachments API;
``qsnap-agent`` runs as a separate process over the private RabbitMQ. One guest, one Cinder
and one agent for the module; the test walks them through many steps. Every step is judged
from every side: the operation, Cinder's records, the ``.info`` ledgers against the real
chains (``qemu-img info -U --backing-chain``, formats pinned) and libvirt's live XML,
``qemu-img check``, no stray file, and the guest's own view of its data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cinderclient import exceptions as cexc

from hostagent.config import make_conf
from hostagent.recovery import CRASH_ENV
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from libvirt_ops import find_disk
from testbed import procs
from testbed.cinder import REPO, CinderPeer
from testbed.guest import GuestDisk
from tests.functional.e2e.checks import qemu_chain
from tests.functional.e2e.conftest import CONNECTOR, VolumeGuest, wait_status
from tests.functional.hostagent.test_agent_assisted import CTX, _final, _sha_in_guest

pytestmark = pytest.mark.functional
EXT = "api_ext.cinder_extension.Qsnap_snapshot_metadata"
MOUNTS = ("/data", "/data2", "/data3")


class InstanceBed:
    """Cinder with three attached volumes, the guest using them, and the agent's identity."""

    def __init__(self, share: Any, rabbit: Any, conn: Any, image: Any) -> None:
        self.share = share
        self.logdir = procs.run_dir() / f"inst-{uuid.uuid4().hex[:6]}"
        self.logdir.mkdir(mode=0o755)
        self.log = self.logdir / "agent.log"
        self.cinder = CinderPeer(
            share.new_dir("cinder"), extra_extensions=(EXT,), pythonpath=(REPO,)
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.guest: Any = None
        self.transport: Any = None
        try:
            self._boot(conn, image)
            self.host = f"inst-{uuid.uuid4().hex[:6]}"
            self.conf = self.logdir / "agent.conf"
            self.conf.write_text(
                f"[DEFAULT]\nhost = {self.host}\ntransport_url = {rabbit.transport_url}\n"
                f"state_path = {self.logdir / 'state'}\n"
                f"[shares]\nallowed_roots = {share.root}\n"
                "[agent]\nworkers = 2\nmerge_timeout = 120\n"
                f"[cinder]\nauth_type = noauth\nendpoint = {self.cinder.endpoint}\n"
                f"project_id = {self.cinder.project_id}\nuser_id = qsnap-agent\n"
            )
            self.transport = get_transport(make_conf(), rabbit.transport_url)
        except BaseException:
            self.close()
            raise

    def _boot(self, conn: Any, image: Any) -> None:
        c = self.cinder.client()
        # failed snapshots stay as 'error' records and count: the crash module makes dozens
        c.quotas.update(self.cinder.project_id, snapshots=-1, gigabytes=-1)
        vols = [c.volumes.create(1, name=f"inst-{i}") for i in range(3)]
        self.vols = [wait_status(c.volumes.get, v.id, {"available", "error"}).id for v in vols]
        mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        disks = []
        for i, vid in enumerate(self.vols):
            path = self.dir / f"volume-{vid}"
            subprocess.run([*mkfs, str(path)], check=True, capture_output=True)
            disks.append(GuestDisk(f"vd{'abc'[i]}", vid, path, MOUNTS[i], "raw"))
        self.guest = VolumeGuest(conn, image, disks, self.logdir)
        for vid in self.vols:
            att = c.attachments.create(vid, CONNECTOR, self.guest.uuid, mode="rw")
            c.attachments.complete(att["id"] if isinstance(att, dict) else att.id)
            assert wait_status(c.volumes.get, vid, {"in-use", "error"}).status == "in-use"

    @property
    def dir(self) -> Path:
        return self.cinder.share_dir

    def start(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        """Start the agent (armed to die at ``crash_at``); wait for its READY line."""
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        env["PYTHONWARNINGS"] = "ignore"
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        argv = [sys.executable, "-m", "hostagent.cli", "--config-file", str(self.conf)]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:  # logs and READY both land here
            proc = subprocess.Popen(
                [*argv, "--ready-line"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        procs.record("qsnap-agent", proc.pid)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            with open(self.log, "rb") as f:
                f.seek(offset)
                if any(line.strip() == b"READY" for line in f):
                    self.proc = proc
                    return proc
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        procs.forget("qsnap-agent", proc.pid)
        pytest.fail("agent did not start: " + self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        rc = proc.wait(timeout=60)
        procs.forget("qsnap-agent", proc.pid)
        assert rc in (0, 137), self.log.read_text()[-3000:]

    def client(self, timeout: int = 30) -> AgentAPI:
        return AgentAPI(self.transport, self.host, timeout=timeout)

    def close(self) -> None:
        for step in (self.stop, getattr(self.guest, "close", None), self.cinder.close):
            if step is not None:
                try:
                    step()
                except Exception as exc:  # keep tearing down
                    print(f"teardown: {exc}", file=sys.stderr)
        if self.transport is not None:
            self.transport.cleanup()

    # -- observations -----------------------------------------------------------------------
    def chain(self, vid: str) -> list[tuple[str, str]]:
        """(basename, format) top first, from libvirt's live XML."""
        disk = find_disk(self.guest.dom, volume_id=vid)
        return [(os.path.basename(lay.path), lay.fmt) for lay in disk.chain]

    def ledger(self, vid: str) -> dict[str, str] | None:
        path = self.dir / f"volume-{vid}.info"
        return json.loads(path.read_text()) if path.exists() else None

    def check(self, vid: str, snapshots: list[str]) -> list[str]:
        """Files, libvirt and ledger agree; ``snapshots`` (oldest first) are the live ones."""
        live = self.chain(vid)
        assert qemu_chain(str(self.dir / live[0][0]), live[0][1]) == live
        names = [n for n, _ in live]
        led = self.ledger(vid)
        if not snapshots:
            assert names == [f"volume-{vid}"] and (led is None or set(led) == {"active"}), led
        else:
            assert led is not None and led["active"] == names[0], (led, names)
            assert {k: v for k, v in led.items() if k != "active"} == {
                s: f"volume-{vid}.{s}" for s in snapshots
            }
            # each snapshot's file is in the chain, newest highest
            assert [names.index(f"volume-{vid}.{s}") for s in snapshots] == sorted(
                (names.index(f"volume-{vid}.{s}") for s in snapshots), reverse=True
            )
        for name, fmt in live:
            res = subprocess.run(
                ["qemu-img", "check", "-U", "-f", fmt, str(self.dir / name)],
                capture_output=True, text=True,
            )  # fmt: skip
            assert fmt == "raw" or res.returncode == 0, res.stdout + res.stderr
        return names

    def no_strays(self) -> None:
        used = {n for vid in self.vols for n, _ in self.chain(vid)}
        files = {
            n for n in os.listdir(self.dir) if n.startswith("volume-") and not n.endswith(".info")
        }
        assert files == used, f"stray files: {files - used}"

    def status(self, sid: str) -> tuple[str, str] | None:
        try:
            s = self.cinder.client().volume_snapshots.get(sid)
        except cexc.NotFound:
            return None
        return str(s.status), str(s.volume_id)


@pytest.fixture(scope="module")
def share() -> Iterator[Any]:
    """The dir share only: Cinder's NfsDriver mounts nothing, and recovery and ledgers are
    share-independent (both share kinds are covered by test_agent_assisted.py)."""
    from testbed.shares import DirShare

    s = DirShare()
    yield s
    s.close()


@pytest.fixture(scope="module")
def ibed(share: Any, rabbitmq: Any, libvirt_host: Any, guest_image: Any) -> Iterator[InstanceBed]:
    b = InstanceBed(share, rabbitmq, libvirt_host.connection, guest_image)
    try:
        yield b
    finally:
        b.close()


def _write(g: Any, mount: str) -> tuple[str, str]:
    path = f"{mount}/f-{uuid.uuid4().hex[:6]}"
    g.check(["dd", "if=/dev/urandom", f"of={path}", "bs=64k", "count=4"], 60)
    return path, _sha_in_guest(g, path)


def test_instance_snapshots_then_owned_deletes(ibed: InstanceBed) -> None:
    b, g = ibed, ibed.guest
    b.start()
    client = b.client()
    data = [_write(g, m) for m in MOUNTS]

    # 1. all disks, quiesce required: ONE operation, three available snapshots in Cinder
    op = _final(client, client.snapshot_instance(CTX, g.uuid, None, api.Quiesce.REQUIRED), 120)
    assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
    assert op.result["quiesced"] is True and sorted(op.volume_ids) == sorted(b.vols)
    first = {s["volume_id"]: s["snapshot_id"] for s in op.result["snapshots"]}
    assert sorted(first) == sorted(b.vols)
    for s in op.result["snapshots"]:
        assert s["file"] == str(b.dir / f"volume-{s['volume_id']}.{s['snapshot_id']}")
    steps = [s["name"] for s in op.result["steps"]]
    assert steps == ["plan", "cinder_create", "overlays", "snapshot", "ledger", "cinder_finalize"]
    for vid, sid in first.items():
        assert b.status(sid) == ("available", vid)
        assert b.check(vid, [sid]) == [f"volume-{vid}.{sid}", f"volume-{vid}"]
    b.no_strays()
    assert g.agent("guest-fsfreeze-status") == "thawed"

    # 2. a subset (one volume), crash-consistent allowed
    later = _write(g, MOUNTS[1])
    v2 = b.vols[1]
    op = _final(client, client.snapshot_instance(CTX, g.uuid, [v2], api.Quiesce.PREFERRED), 120)
    assert op.state is api.OperationState.SUCCEEDED, op.error
    (snap,) = op.result["snapshots"]
    assert snap["volume_id"] == v2 and b.status(snap["snapshot_id"]) == ("available", v2)
    b.check(v2, [first[v2], snap["snapshot_id"]])
    for vid in (b.vols[0], b.vols[2]):
        b.check(vid, [first[vid]])  # not listed: untouched

    # 3. refusals touch nothing
    before = sorted(os.listdir(b.dir))
    with pytest.raises(api.VolumeNotFound):
        client.snapshot_instance(CTX, g.uuid, [str(uuid.uuid4())], api.Quiesce.NONE)
    with pytest.raises(api.SnapshotNotFound):
        client.delete_snapshot(CTX, v2, str(uuid.uuid4()))
    assert sorted(os.listdir(b.dir)) == before

    # 4. delete the newest by the RPC: active commit + pivot, ledger's active moves back
    after_snap = _write(g, MOUNTS[1])
    op = _final(client, client.delete_snapshot(CTX, v2, snap["snapshot_id"]), 120)
    assert op.state is api.OperationState.SUCCEEDED, (op.error, b.log.read_text()[-3000:])
    assert op.kind is api.OperationKind.DELETE_OWNED and op.result["kind"] == "active-commit"
    assert op.result["progress"]["end"] > 0
    assert b.status(snap["snapshot_id"]) is None  # Cinder's record is gone
    assert not (b.dir / f"volume-{v2}.{snap['snapshot_id']}").exists()
    assert b.check(v2, [first[v2]]) == [f"volume-{v2}.{first[v2]}", f"volume-{v2}"]
    assert b.ledger(v2) == {
        "active": f"volume-{v2}.{first[v2]}",
        first[v2]: f"volume-{v2}.{first[v2]}",
    }

    # 5. delete an all-disks snapshot on another volume (its file is the top there too)
    v3 = b.vols[2]
    op = _final(client, client.delete_snapshot(CTX, v3, first[v3]), 120)
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert b.status(first[v3]) is None and b.check(v3, []) == [f"volume-{v3}"]
    assert b.ledger(v3) == {"active": f"volume-{v3}"}
    b.no_strays()

    # the guest sees every byte it wrote, before and after each snapshot and delete
    for path, digest in [*data, later, after_snap]:
        assert _sha_in_guest(g, path) == digest, path
    assert g.agent("guest-fsfreeze-status") == "thawed"
    b.stop()
