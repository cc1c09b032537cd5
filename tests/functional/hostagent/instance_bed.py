"""The bed of the instance-snapshot modules: a real Cinder 29 (qsnap's extension loaded)
owning three volumes whose files on a plain directory share are the three disks of one TCG
guest, attached through the attachments API, and ``qsnap-agent`` over the private RabbitMQ;
plus what each step is judged by (live chain, files' headers, ledgers, Cinder's records).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from cinderclient import exceptions as cexc

from hostagent.rpc.client import AgentAPI
from libvirt_ops import find_disk
from testbed import procs
from testbed.agent import AgentProcess, noauth_cinder
from testbed.cinder import REPO, CinderPeer, attached_guest
from testbed.layers import qemu_chain

EXT = "api_ext.cinder_extension.Qsnap_snapshot_metadata"
MOUNTS = ("/data", "/data2", "/data3")


class InstanceBed:
    """Cinder with three attached volumes, the guest using them, and the agent's identity."""

    def __init__(self, share: Any, rabbit: Any, conn: Any, image: Any) -> None:
        self.share = share
        self.logdir = procs.run_dir() / f"inst-{uuid.uuid4().hex[:6]}"
        self.logdir.mkdir(mode=0o755)
        self.cinder = CinderPeer(
            share.new_dir("cinder"), extra_extensions=(EXT,), pythonpath=(REPO,)
        )
        self.guest: Any = None
        try:
            self.agent = AgentProcess(
                self.logdir, rabbit.transport_url, share.root, prefix="inst",
                conf={
                    "agent": {"workers": 2, "merge_timeout": 120},
                    "cinder": noauth_cinder(self.cinder, user_id="qsnap-agent"),
                },
            )  # fmt: skip
        except BaseException:
            self.cinder.close()
            raise
        try:
            # failed snapshots stay as 'error' records and count: the crash module makes dozens
            self.cinder.client().quotas.update(self.cinder.project_id, snapshots=-1, gigabytes=-1)
            self.vols, self.guest = attached_guest(self.cinder, conn, image, MOUNTS, self.logdir)
        except BaseException:
            self.close()
            raise

    @property
    def dir(self) -> Path:
        return self.cinder.share_dir

    @property
    def log(self) -> Path:
        return self.agent.log

    def start(self, crash_at: str | None = None) -> None:
        """Start the agent (armed to die at ``crash_at``); wait for its READY line."""
        self.agent.start(crash_at)

    def stop(self) -> None:
        rc = self.agent.stop()
        assert rc in (None, 0, 137), self.agent.tail()

    def client(self, timeout: int = 30) -> AgentAPI:
        return self.agent.client(timeout)

    def close(self) -> None:
        for step in (
            self.stop,
            getattr(self.guest, "close", None),
            self.cinder.close,
            self.agent.close,
        ):
            if step is not None:
                try:
                    step()
                except Exception as exc:  # keep tearing down
                    print(f"teardown: {exc}", file=sys.stderr)

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
