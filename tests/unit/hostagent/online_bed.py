"""The bed of :mod:`hostagent.backup.online`'s unit tests: the fake hypervisor with real
commits, the real owned snapshot paths behind the real :class:`OwnedCheckpoints`, a real
repository. Not a test module."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from hostagent.backup import online
from hostagent.backup import repo as bk
from hostagent.cinder.outbox import NoCinder, NotifyQueue
from hostagent.hypervisor import DiskLocks, Located
from hostagent.journal import crash as crash_mod
from hostagent.journal.store import Journal
from hostagent.pool import KeyedPool
from hostagent.snapshots.backup_checkpoints import OwnedCheckpoints
from hostagent.snapshots.owned import OwnedOps
from qcow2 import Ledger, read_ledger
from tests.unit.hostagent.fakes import DOM, VOL, FakeHypervisor, FakeMeta, make_image


class CommittingHypervisor(FakeHypervisor):
    """Owned merges move the data as QEMU's commits do (``qemu-img commit`` into the backing
    file first), so the guest view after a backup dropped a checkpoint is the real one."""

    def merge_owned(self, where: Located, file: str, progress: Any) -> dict[str, Any]:
        if self.fail is None and file in self.chains[str(where.disk.serial)][:-1]:
            argv = ["qemu-img", "commit", "-q", "-f", "qcow2", "-d", str(self.dir / file)]
            subprocess.run(argv, check=True)
        return super().merge_owned(where, file, progress)


class OnlineBed:
    """A running guest with one 8 MiB volume (1 MiB of data), the owned snapshot paths as
    :class:`AssistedService` builds them (``meta`` None: no Cinder) behind the real
    :class:`OwnedCheckpoints`, and a real repository: what ``online.backup_volume`` runs on."""

    def __init__(self, tmp: Path, meta: FakeMeta | None = None) -> None:
        self.dir = tmp / "share"
        self.dir.mkdir()
        make_image(self.dir / f"volume-{VOL}", size="8M", pattern=0x11)
        self.hv = CommittingHypervisor(self.dir)
        self.roots = [str(tmp)]
        self.journal = Journal(str(tmp / "j.sqlite"), host="h")
        self.pool = KeyedPool(1)
        queue = NotifyQueue(self.journal, NoCinder(), meta=meta)
        self.step = crash_mod.crash_pointed(self.journal)
        parts = (self.journal, self.hv, queue, self.pool, DiskLocks())
        self.owned = OwnedOps(*parts, roots=self.roots, step=self.step)
        self.checkpoints: online.CheckpointOps = OwnedCheckpoints(self.owned)
        self.repo = bk.Repository.create(tmp / "repo")

    def backup(self, incremental: bool, **kw: Any) -> online.OnlineBackupResult:
        """One online backup of :data:`VOL` (``kw``: ``backup_volume``'s keywords)."""
        req = online.BackupRequest(DOM, VOL, self.repo.path, incremental=incremental)
        cps = kw.pop("checkpoints", self.checkpoints)
        kw.setdefault("step", self.step)
        return online.backup_volume(self.hv, self.journal, req, cps, roots=self.roots, **kw)

    def ledger(self) -> Ledger | None:
        return read_ledger(str(self.dir), VOL)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.journal.close()
