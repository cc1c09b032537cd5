"""What "right" means after every end-to-end step, checked from every side.

Cinder's view (snapshot statuses, the ``.info`` ledger), the files (``qemu-img info
--backing-chain`` with formats pinned, ``qemu-img check``, no stray file), libvirt's view
(the live domain XML chain) and the guest's view (record log a clean, growing log; files
keep their checksums) must all agree; any one of them alone could be fooled.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from cinderclient import exceptions as cinder_exc

from hostagent.rpc import contract as api
from libvirt_ops import find_disk
from testbed.cinder import wait_status
from testbed.layers import qemu_chain
from testbed.records import RecordLog
from tests.functional.e2e.deployment import Deployment


def live_chain(d: Deployment) -> list[tuple[str, str]]:
    disk = find_disk(d.guest.dom, volume_id=d.volume_id)
    return [(os.path.basename(layer.path), layer.fmt) for layer in disk.chain]


def ledger(d: Deployment) -> dict[str, str] | None:
    path = d.vol_dir / f"volume-{d.volume_id}.info"
    return json.loads(path.read_text()) if path.exists() else None


def _qemu_img_check(d: Deployment, name: str) -> None:
    res = subprocess.run(
        ["qemu-img", "check", "-U", "-f", "qcow2", str(d.vol_dir / name)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


def check_image_files(d: Deployment, snapshots: list[str]) -> list[str]:
    """Chain, ledger and files agree; ``snapshots`` are the live ones, oldest first.

    The ledger maps each snapshot to the file created when it was taken (its point in
    time is that file's backing), so: ``active`` is the top, the ledger's files are exactly
    the chain's overlays, and a later snapshot never maps below an earlier one.
    """
    live = live_chain(d)
    chain = qemu_chain(str(d.vol_dir / live[0][0]), live[0][1])
    assert chain == live, f"files say {chain}, libvirt says {live}"
    names = [n for n, _ in chain]
    info = ledger(d)
    if info is None:
        assert not snapshots and names == [f"volume-{d.volume_id}"], names
    else:
        assert info["active"] == names[0], (info, names)
        assert set(info) - {"active"} == set(snapshots), (info, snapshots)
        assert set(info.values()) == set(names[:-1]) | {names[0]}, (info, names)
        depth = [names.index(info[s]) for s in snapshots]
        assert depth == sorted(depth, reverse=True), (info, names)
    for name, fmt in chain[1:]:
        if fmt == "qcow2":
            _qemu_img_check(d, name)
    if chain[0][1] == "qcow2":
        # the active file is being written: only a frozen guest (QEMU flushed its qcow2
        # caches, nothing in flight) gives a consistent on-disk image to check
        d.guest.agent("guest-fsfreeze-freeze", timeout=30)
        try:
            _qemu_img_check(d, names[0])
        finally:
            d.guest.agent("guest-fsfreeze-thaw", timeout=30)
    mine = {n for n in os.listdir(d.vol_dir) if n.startswith(f"volume-{d.volume_id}")}
    expected = set(names) | ({f"volume-{d.volume_id}.info"} if info is not None else set())
    assert mine == expected, f"stray or missing files: {sorted(mine ^ expected)}"
    return names


def check_cinder(d: Deployment, available: list[str], gone: list[str]) -> None:
    c = d.client()
    for sid in available:
        s = c.volume_snapshots.get(sid)
        assert (s.status, s.progress) == ("available", "100%"), (sid, s.status, s.progress)
    for sid in gone:
        try:
            s = c.volume_snapshots.get(sid)
        except cinder_exc.NotFound:
            continue
        raise AssertionError(f"snapshot {sid} still there: {s.status}")
    assert c.volumes.get(d.volume_id).status == "in-use"


class GuestData:
    """Files of known checksum in the guest plus its record writer's log."""

    def __init__(self, guest: Any, mount: str = "/data", *, records: bool = True) -> None:
        self.g = guest
        self.mount = mount
        self.records = records  # False: no writer ran on this mount (a test run alone)
        self.files: dict[str, str] = {}
        self.log: RecordLog | None = None

    def add_file(self) -> None:
        path = f"{self.mount}/f-{uuid.uuid4().hex[:8]}"
        out = self.g.check(
            ["/bin/sh", "-c", f"dd if=/dev/urandom of={path} bs=64k count=4 2>/dev/null && "
             f"sha256sum {path}"], 60,
        )  # fmt: skip
        self.files[path] = bytes(out).split()[0].decode()

    def check(self) -> None:
        """Reread from the disk (caches dropped): checksums kept, the record log clean and
        an extension of what it was at the previous check. One guest-exec for all files:
        each costs a TCG round trip."""
        script = "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum " + " ".join(self.files)
        out = bytes(self.g.check(["/bin/sh", "-c", script], 60)).decode()
        got = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.strip()}
        assert got == self.files, "files changed in the guest"
        if not self.records:
            return
        log = self.g.records(self.mount)
        assert log.clean, log.problems
        if self.log is not None:
            assert self.log.is_prefix_of(log), "the record log lost or rewrote records"
        self.log = log


def agent_op(d: Deployment, snapshot_id: str, kind: str) -> Any:
    """The agent's journaled operation for this snapshot (proves the request went the
    whole way: Cinder -> qsnap-api -> RabbitMQ -> agent)."""
    ctx = {"request_id": "req-e2e"}
    found = [
        op
        for op in d.agent.list_operations(ctx)
        if op.snapshot_id == snapshot_id and op.kind.value == kind
    ]
    assert len(found) == 1, (snapshot_id, kind, found)
    return found[0]


def cinder_snapshot(d: Deployment) -> str:
    """``snapshot-create --force`` on the in-use volume; Cinder must see it done, and the
    agent's assisted create must have succeeded."""
    c = d.client()
    s = c.volume_snapshots.create(d.volume_id, force=True)
    s = wait_status(c.volume_snapshots.get, s.id, {"available", "error"})
    assert s.status == "available", d.cinder.tail()
    op = agent_op(d, s.id, "create_assisted_snapshot")
    assert op.state is api.OperationState.SUCCEEDED, op.error
    return str(s.id)


def cinder_delete(d: Deployment, sid: str) -> str:
    """Cinder's own delete, awaited; the merge mode the agent chose from its delete_info."""
    c = d.client()
    c.volume_snapshots.delete(sid)
    deadline = time.monotonic() + 300
    while True:
        try:
            s = c.volume_snapshots.get(sid)
        except cinder_exc.NotFound:
            break
        assert s.status in ("deleting", "available"), d.cinder.tail()
        assert time.monotonic() < deadline, f"{sid} still {s.status}"
        time.sleep(0.2)
    op = agent_op(d, sid, "delete_assisted_snapshot")
    assert op.state is api.OperationState.SUCCEEDED, op.error
    return str(next(s for s in op.result["steps"] if s["name"] == "validate")["data"]["mode"])


def api_request(d: Deployment, method: str, path: str, body: bytes | None, **headers: str) -> Any:
    """One raw request; returns (status, parsed JSON body or None)."""
    req = urllib.request.Request(d.api_url + path, data=body, method=method)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    for k, v in headers.items():
        req.add_header(k.replace("_", "-"), v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    if status == 413 and not raw.startswith(b"{"):
        # cheroot refuses an oversized body before the app sees it, in plain text
        return status, {"requestEntityTooLarge": {"code": 413, "message": raw.decode()}}
    try:
        return status, (json.loads(raw) if raw else None)
    except ValueError:
        raise AssertionError(f"{method} {path}: {status}, non-JSON body {raw[:300]!r}") from None
