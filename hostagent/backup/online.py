"""Online backup of a volume attached to a running guest, read at a RECORDED Cinder snapshot.

One volume's backup is one journaled operation (kind ``backup``), each step journaled
before it acts::

    chain before:  B <- ... <- C_old <- ... <- T (active)   C_old: the parent backup's checkpoint
    1 checkpoint:  ... <- T <- C_new   a snapshot named "qsnap backup checkpoint (operation
                   <op>)", taken and recorded as an instance snapshot is (ledger, Cinder's
                   record + attachment + format, Nova's BDM): its own journaled operation
    2 read:        T's frozen guest view; incremental = the clusters allocated from T down
                   to C_old's file (the ledger's, found by C_old's snapshot id), else the
                   whole view (deduplicated) and why; the manifest, published last, names
                   C_new as its checkpoint (none for a plain backup)
    3 drop:        owned deletes of every other backup checkpoint of the volume still in
                   the ledger (C_old, a killed backup's, C_new itself for a plain backup)

Why this design (issue 15): every layer of the live chain is always one Cinder's ledger,
its attachment and Nova's BDM name, so a hard reboot, a stop/start, a migration, Cinder's
clone or its own backup never miss a write. Dirty bitmaps were the other choice; the NFS
driver's base volumes are RAW files, which cannot hold a persistent bitmap. The cost:
Cinder refuses a plain delete of a volume while its checkpoint snapshot exists (delete it,
or ``--cascade``); deleting the checkpoint only makes the next backup a full one.

Why the incremental is exact: remotefs deletes (and the agent's) either commit a layer into
its backing file or pull a backing file into the active layer and re-point the ledger's id
at it, so the layers from C_old's CURRENT file up hold precisely the writes since C_old's
point in time, whatever snapshots came and went above or below it (the boundary is that
file's backing file now, not its name then).

A kill at any point publishes nothing half written (the manifest is last); every chain
change is an owned operation that recovery resumes by itself, so :func:`recover_backup` only
decides this operation's state, and the next backup drops the checkpoints left behind.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hostagent.backup.repo.engine import BackupResult, backup_full, backup_incremental
from hostagent.backup.repo.format import (
    BackupCancelled,
    BackupError,
    Cancel,
    Checkpoint,
    Manifest,
    Progress,
)
from hostagent.backup.repo.repository import Repository
from hostagent.hypervisor import Hypervisor, Located, chain_names
from hostagent.journal.crash import StepFn
from hostagent.journal.model import (
    Operation,
    OperationKind,
    OperationRecord,
    OperationState,
    StepName,
    StepState,
)
from hostagent.journal.store import Journal
from qcow2 import read_ledger
from qcow2.naming import is_uuid, snapshot_file_name

LOG = logging.getLogger(__name__)
LABEL = "qsnap backup checkpoint"


class CheckpointOps(Protocol):
    """How a backup takes and drops the snapshot it reads at: the agent's owned snapshot
    paths, run in the caller's thread (which holds the disk's lock), each its own journaled
    operation. Both raise :class:`CheckpointFailed` when the operation did not succeed."""

    def take(self, where: Located, snapshot_id: str, label: str, why: str) -> str:
        """Snapshot ``where`` as ``snapshot_id`` (recorded everywhere); the new file's name."""
        ...

    def drop(self, volume_id: str, snapshot_id: str, why: str) -> None:
        """Delete the recorded snapshot ``snapshot_id`` (merge, ledger, Cinder, Nova)."""
        ...


@dataclass(frozen=True)
class BackupRequest:
    """One volume's backup.

    ``incremental``: build on the previous backup's checkpoint if the ledger still has it
    (else a full read with dedup; ``result.fallback_reason`` says why) and, unless
    ``keep_checkpoint`` is False, keep this backup's checkpoint snapshot for the next one.
    A plain backup keeps none: its checkpoint is deleted once the backup is published.
    """

    domain: str
    volume_id: str
    repository: str
    incremental: bool = False
    keep_checkpoint: bool | None = None  # None: keep one iff incremental

    @property
    def keeps_checkpoint(self) -> bool:
        return self.incremental if self.keep_checkpoint is None else self.keep_checkpoint


@dataclass(frozen=True)
class OnlineBackupResult:
    operation_id: str
    result: BackupResult
    checkpoint: str | None  # the kept checkpoint's snapshot id, if any
    checkpoint_file: str | None  # its file (volume-<vid>.<snapshot id>), if kept
    dropped: tuple[str, ...]  # checkpoint snapshot ids deleted after the publish
    chain_after: tuple[str, ...]

    @property
    def incremental(self) -> bool:
        return self.result.manifest.kind == "incremental"


class ChainChanged(BackupError):
    """The live chain is not what the backup expects (someone else touched it)."""


class VolumeBusy(BackupError):
    """Another journaled operation on this volume is unfinished (or awaits recovery)."""


class CheckpointFailed(BackupError):
    """Taking or dropping a backup checkpoint (an owned snapshot operation) failed."""


def _latest(repo: Repository, volume_id: str) -> Manifest | None:
    """The volume's newest backup, whole (the headers pick it; only it is loaded)."""
    hs = repo.headers(volume_id)
    return repo.load(volume_id, hs[-1].backup_id) if hs else None


def backup_volume(
    hv: Hypervisor,
    journal: Journal,
    req: BackupRequest,
    checkpoints: CheckpointOps,
    *,
    roots: Sequence[str],
    step: StepFn | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    not_busy: Callable[[Operation], bool] | None = None,
) -> OnlineBackupResult:
    """Back up ``req.volume_id`` of the running ``req.domain`` (see the module docstring).

    The caller holds the agent's per-disk lock for the volume (no other operation changes
    the chain meanwhile). ``step`` journals each step (default ``journal.step``; the agent
    passes its crash-pointed one). ``not_busy``: unfinished operations it accepts do not
    make the volume busy (the request-level backup operation). Raises
    :class:`hostagent.backup.BackupError` subclasses, ``rpc.contract`` refusals or
    ``qcow2`` errors; a checkpoint taken for an unpublished backup is dropped first.
    """
    if not is_uuid(req.volume_id):
        raise ValueError(f"bad volume id {req.volume_id!r}")
    repo = Repository.open(req.repository)
    rts = list(roots)
    where = hv.locate(req.volume_id)
    if where.domain_uuid != req.domain:
        raise ChainChanged(f"volume {req.volume_id} is attached to {where.domain_uuid} now")
    before = chain_names(where, rts)  # whole chain inspected: only Cinder's names
    lock = f"volume:{req.volume_id}"
    busy = journal.list_operations(
        states=(OperationState.PENDING, OperationState.RUNNING), lock=lock
    )
    busy = [b for b in busy if not_busy is None or not not_busy(b)]
    if busy:  # the caller's per-disk lock is the real exclusion; this catches a forgotten one
        raise VolumeBusy(f"volume {req.volume_id} has unfinished {busy[0].kind} {busy[0].id}")
    sid = str(uuid.uuid4())
    request = {
        "domain": req.domain,
        "volume_id": req.volume_id,
        "repository": repo.path,
        "incremental": req.incremental,
        "keep_checkpoint": req.keeps_checkpoint,
        "target": where.disk.target,
        "chain_before": before,
        "checkpoint": {"snapshot_id": sid, "file": snapshot_file_name(req.volume_id, sid)},
    }
    op = journal.begin(OperationKind.BACKUP, request, locks=[lock]).operation
    run = _Run(hv, journal, step or journal.step, op.id, req, repo, rts, checkpoints, sid)
    try:
        return run.run(where, progress, cancel)
    except BaseException as exc:
        if isinstance(exc, Exception):
            decision = run.abandon()
            cancelled = isinstance(exc, BackupCancelled)
            state = OperationState.CANCELLED if cancelled else OperationState.FAILED
            journal.finish(op.id, state, error=exc)
            exc.add_note(f"checkpoint: {decision}")
        raise


class _Run:
    """One backup operation's steps (see the module docstring)."""

    def __init__(
        self,
        hv: Hypervisor,
        journal: Journal,
        step: StepFn,
        op: uuid.UUID,
        req: BackupRequest,
        repo: Repository,
        roots: list[str],
        checkpoints: CheckpointOps,
        sid: str,
    ) -> None:
        self.hv, self.j, self.step, self.op, self.req = hv, journal, step, op, req
        self.repo, self.roots, self.cps, self.sid = repo, roots, checkpoints, sid
        self.taken = self.published = False

    def run(
        self, where: Located, progress: Progress | None, cancel: Cancel | None
    ) -> OnlineBackupResult:
        req, vid = self.req, self.req.volume_id
        label = f"{LABEL} (operation {self.op})"
        with self.step(self.op, StepName.CHECKPOINT, {"snapshot_id": self.sid}) as h:
            self.taken = True
            h.data["file"] = self.cps.take(where, self.sid, label, f"backup {self.op}")
        where = self.hv.locate(vid)
        names = chain_names(where, self.roots)
        if names[0] != snapshot_file_name(vid, self.sid) or len(names) < 2:
            raise ChainChanged(f"checkpoint {self.sid} is not the live top of {names}")
        frozen, parent = names[1], _latest(self.repo, vid)
        boundary, reason = self._tracking(parent, names, os.path.dirname(where.disk.source))
        cp = Checkpoint(names[0], frozen, self.sid) if req.keeps_checkpoint else None
        path = os.path.join(os.path.dirname(where.disk.source), frozen)
        fmt = where.disk.chain[1].fmt
        data = {"frozen": frozen, "boundary": boundary, "fallback_reason": reason}
        with self.step(self.op, StepName.READ, data) as h:
            prog = _journaled_progress(self.j, self.op, progress)
            res = self._read(path, fmt, parent, boundary, reason, cp, prog, cancel)
            self.published = True
            h.data["backup_id"] = res.manifest.backup_id
        dropped = self.drop_stale(keep=self.sid if req.keeps_checkpoint else None)
        after = chain_names(self.hv.locate(vid), self.roots)
        result = {
            "backup_id": res.manifest.backup_id,
            "kind": res.manifest.kind,
            "bytes_read": res.bytes_read,
            "fallback_reason": res.fallback_reason,
            "checkpoint": cp.snapshot_id if cp else None,
            "checkpoint_file": cp.overlay if cp else None,
            "dropped": dropped,
            "chain_after": after,
        }
        self.j.finish(self.op, OperationState.SUCCEEDED, result=result)
        kept, kept_file = (cp.snapshot_id, cp.overlay) if cp else (None, None)
        return OnlineBackupResult(str(self.op), res, kept, kept_file, tuple(dropped), tuple(after))

    def _tracking(
        self, parent: Manifest | None, names: list[str], directory: str
    ) -> tuple[str | None, str | None]:
        """(boundary, None) when the parent's checkpoint still tracks the changes, else
        (None, why the read is full). Only for an incremental request."""
        if not self.req.incremental:
            return None, None
        if parent is None:
            return None, "no previous backup of this volume"
        cp = parent.checkpoint
        if cp is None:
            return None, f"previous backup {parent.backup_id} left no checkpoint"
        if cp.snapshot_id is None:
            return None, f"previous backup {parent.backup_id} has a pre-1.0 checkpoint overlay"
        ledger = read_ledger(directory, self.req.volume_id)
        file = ledger.snapshots.get(cp.snapshot_id) if ledger is not None else None
        if file is None:
            return None, (
                f"checkpoint snapshot {cp.snapshot_id} of backup {parent.backup_id} was "
                "deleted (not in the volume's ledger)"
            )
        if file not in names[1:-1]:
            return None, f"checkpoint file {file} is not a layer with a backing file in {names}"
        return names[names.index(file) + 1], None

    def _read(
        self,
        path: str,
        fmt: str,
        parent: Manifest | None,
        boundary: str | None,
        reason: str | None,
        cp: Checkpoint | None,
        progress: Progress,
        cancel: Cancel | None,
    ) -> BackupResult:
        args = (path, fmt, self.roots, self.repo, self.req.volume_id)
        if boundary is not None and parent is not None:
            return backup_incremental(
                *args, parent, boundary, progress=progress, cancel=cancel,
                parent_boundary=boundary, checkpoint=cp,
            )  # fmt: skip
        return backup_full(
            *args, progress=progress, cancel=cancel, parent=parent if self.req.incremental
            else None, fallback_reason=reason, checkpoint=cp,
        )  # fmt: skip

    def drop_stale(self, keep: str | None) -> list[str]:
        """Owned deletes of the volume's backup checkpoints in the ledger but ``keep``; the
        ids deleted. One that fails stays recorded (coherent) and is retried next time."""
        vid = self.req.volume_id
        stale = [s for s in known_checkpoints(self.j, self.repo, vid) if s != keep]
        where = self.hv.locate(vid)
        ledger = read_ledger(os.path.dirname(where.disk.source), vid)
        stale = [s for s in stale if ledger is not None and s in ledger.snapshots]
        if not stale:
            return []
        dropped: list[str] = []
        with self.step(self.op, StepName.DROP_CHECKPOINTS, {"snapshots": stale}) as h:
            for s in stale:
                try:
                    self.cps.drop(vid, s, f"backup {self.op}")
                    dropped.append(s)
                except Exception as exc:  # stays a recorded snapshot: nothing is hidden
                    LOG.warning("backup %s: checkpoint %s not dropped: %s", self.op, s, exc)
                    h.data.setdefault("left", {})[s] = f"{type(exc).__name__}: {exc}"
            h.data["dropped"] = dropped
        return dropped

    def abandon(self) -> str:
        """After an error: drop this backup's checkpoint unless its backup was published."""
        if not self.taken or self.published:
            return "none taken" if not self.taken else "kept by the published backup"
        try:
            where = self.hv.locate(self.req.volume_id)
            ledger = read_ledger(os.path.dirname(where.disk.source), self.req.volume_id)
            if ledger is None or self.sid not in ledger.snapshots:
                return f"{self.sid} was not recorded"
            self.cps.drop(self.req.volume_id, self.sid, f"backup {self.op} failed")
        except Exception as exc:  # recorded, so coherent; the next backup drops it
            return f"{self.sid} left recorded ({exc}); the next backup drops it"
        return f"{self.sid} dropped"


def known_checkpoints(journal: Journal, repo: Repository, volume_id: str) -> list[str]:
    """Every checkpoint snapshot id a backup of ``volume_id`` took: the journal's backup
    operations (a killed one's included) and the repository's manifests, oldest first."""
    out: dict[str, None] = {}
    for h in repo.headers(volume_id):
        if h.checkpoint is not None and h.checkpoint.snapshot_id is not None:
            out[h.checkpoint.snapshot_id] = None
    for op in journal.list_operations(kind=OperationKind.BACKUP, lock=f"volume:{volume_id}"):
        cp = op.request.get("checkpoint")
        if isinstance(cp, dict) and isinstance(cp.get("snapshot_id"), str):
            out[cp["snapshot_id"]] = None
    return list(out)


def _journaled_progress(journal: Journal, op: uuid.UUID, user: Progress | None) -> Progress:
    """Report bytes read to the journal (what ``ops show`` displays), at most once a second."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done >= total:
            last[0] = now
            journal.set_progress(op, done, total)
        if user is not None:
            user(done, total)

    return report


def recover_backup(journal: Journal, record: OperationRecord) -> str:
    """Recovery of an unfinished online backup: SUCCEEDED if its manifest was published,
    else FAILED. It never touches a chain: its checkpoint and drops are owned operations
    that recovery resumes by themselves, and the next backup of the volume drops the
    checkpoints left behind. Idempotent."""
    op = record.operation
    if op.kind is not OperationKind.BACKUP:
        raise ValueError(f"{op.kind} is not a backup")
    for s in record.steps:
        if s.state is StepState.PLANNED:
            journal.step_undone(op.id, s.seq, {"recovery": "interrupted by a restart"})
    published = [s for s in record.steps if s.name == StepName.READ and s.state is StepState.DONE]
    later = "its checkpoint snapshot, if recorded, is dropped by the next backup of the volume"
    if published:
        bid = published[-1].data.get("backup_id")
        journal.finish(op.id, OperationState.SUCCEEDED, result={"backup_id": bid, "note": later})
        return f"published as {bid}; {later}"
    journal.finish(op.id, OperationState.FAILED, error=RuntimeError(f"interrupted; {later}"))
    return f"not published: failed; {later}"
