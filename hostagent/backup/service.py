"""RPC 1.2's backups in the agent: create (volumes in parallel), list/get/verify/delete,
restore, prune, over the shared repository; RPC 1.3's cancel and prune operation.

A create is one journaled request-level operation (kind backup, ``action`` create) holding
the ``volume:`` locks of its volumes; each volume then runs as its own journaled online
backup (:func:`hostagent.backup.backup_volume`, recovered by ``recover_backup``) in the pool
under the per-disk lock, at most ``max_parallel`` at once; the request's steps, progress and
result gather the volumes'. Everything a caller sends (ids, paths) is validated before any
operation is journaled or any file touched.

Cancel (RPC 1.3) is cooperative: the running work checks the request's flag between chunks
(and the bandwidth throttle while it sleeps), so nothing is ever half written or half
deleted; the request-level operation then ends ``cancelled`` with a result naming what did
finish (published backups stay published).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from hostagent.backup import repo as bk
from hostagent.backup.create import CreateRun, RunDeps
from hostagent.backup.live import (
    BackupEngine,
    BackupSettings,
    Cancel,
    LiveEngine,
    Progress,
    request_level,
)
from hostagent.backup.repo.engine import RateLimit
from hostagent.backup.repo.target import TargetChanged, dir_identity, remove_partial
from hostagent.hypervisor import DiskLocks, Hypervisor, chain_names
from hostagent.journal import model as ops
from hostagent.journal import store as jn
from hostagent.journal.model import StepName
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import wire_errors
from hostagent.snapshots.owned_base import checked_ledger

LOG = logging.getLogger(__name__)

__all__ = ["BackupEngine", "BackupService", "BackupSettings", "LiveEngine", "request_level"]


def _under(path: str, roots: list[str]) -> bool:
    real = [os.path.realpath(r) for r in roots]
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in real)


class BackupService:
    """The backup methods of :class:`hostagent.service.AssistedService`."""

    #: The operation kinds resumed by :func:`resume` after a crash (recovery's registry keys).
    KINDS = (ops.OperationKind.BACKUP, ops.OperationKind.RESTORE)

    def __init__(
        self,
        journal: jn.Journal,
        hv: Hypervisor,
        pool: KeyedPool,
        locks: DiskLocks,
        engine: BackupEngine,
        settings: BackupSettings,
        *,
        roots: list[str],
    ) -> None:
        self._j, self._hv, self._pool, self._locks = journal, hv, pool, locks
        self._engine, self._s, self._roots = engine, settings, roots
        self._cancel: set[uuid.UUID] = set()
        self._guard = threading.Lock()
        self._run_deps = RunDeps(
            journal, hv, pool, locks, engine, settings, self.cancelled,
            self._stream_progress, self._finish_cancelled, self._forget,
        )  # fmt: skip

    # -- repository -----------------------------------------------------------------------
    def _repo(self, *, create: bool = False) -> bk.Repository | None:
        """The repository; None when there is none yet (reads find nothing). ``create``
        (a backup) makes one only where ``create_repository`` allows it: a missing or empty
        repository directory usually means its share is not mounted."""
        path = self._s.repository
        with wire_errors():
            if os.path.exists(os.path.join(path, "config.json")):
                return bk.Repository.open(path)
            if not create:
                return None
            if not self._s.create_repository:
                what = "does not exist" if not os.path.isdir(path) else "holds no repository"
                raise api.InvalidRequest(
                    f"backup repository {path} {what}: is its share mounted? (to start a new "
                    "repository there, set [backup] create_repository = true)"
                )
            cfg = bk.RepoConfig(chunk_size=self._s.chunk_size, zstd_level=self._s.zstd_level)
            return bk.Repository.create(path, cfg)

    def _find(self, backup_id: str) -> tuple[bk.Repository, bk.Manifest]:
        repo = self._repo()
        if repo is None:
            raise api.BackupNotFound(f"no backup {backup_id} (the repository is empty)")
        with wire_errors():
            return repo, repo.find(backup_id)

    @staticmethod
    def _stored(repo: bk.Repository, m: bk.Manifest) -> int:
        total = 0
        for cid in m.chunk_ids():
            with contextlib.suppress(OSError):
                total += os.stat(repo.chunk_path(cid)).st_size
        return total

    @staticmethod
    def _summary(h: bk.ManifestHeader | bk.Manifest) -> dict[str, Any]:
        """A backup as listed: header fields only (a listing never reads extents or chunks,
        so 100 backups of a 1 TiB volume list in a few MiB and well within the RPC timeout)."""
        data = h.data_bytes if isinstance(h, bk.ManifestHeader) else h.data_bytes()
        return {
            "id": h.backup_id,
            "volume_id": h.volume_id,
            "created_at": h.created_at,
            "parent": h.parent_id,
            "incremental": h.kind == "incremental",
            "size": h.virtual_size,
            "data_bytes": data,
            "checkpoint": None if h.checkpoint is None else h.checkpoint.overlay,
        }

    # -- create ---------------------------------------------------------------------------
    def create_backup(self, req: api.CreateBackupRequest) -> ops.Operation:
        if req.instance_uuid is not None:
            found = self._hv.instance_volumes(req.instance_uuid)
            if not found:
                raise api.InvalidRequest(f"instance {req.instance_uuid} has no volume disks")
        else:
            assert req.volume_ids is not None
            found = [self._hv.locate(v) for v in req.volume_ids]
        for where in found:  # the whole chain inspected now: a refusal touches nothing
            names = chain_names(where, self._roots)
            vid = str(where.disk.serial).lower()
            ledger = checked_ledger(os.path.dirname(where.disk.source), vid)
            if ledger is not None and ledger.active != names[0]:  # its checkpoint would fail
                raise api.InvalidRequest(
                    f"ledger of {vid} says {ledger.active!r} is active, the chain's top is "
                    f"{names[0]!r}"
                )
        vols = [str(w.disk.serial).lower() for w in found]
        self._repo(create=True)
        request = {
            "action": "create",
            "volume_ids": vols,
            "instance_uuid": req.instance_uuid,
            "incremental": req.incremental,
        }
        op = self._j.begin(ops.OperationKind.BACKUP, request, locks=[f"volume:{v}" for v in vols])
        run = CreateRun(self._run_deps, op.operation.id, found, req.incremental)
        run.launch()
        return op.operation

    def cancel(self, op_id: uuid.UUID) -> None:
        """Ask a running create/verify/prune/restore to stop at its next chunk."""
        with self._guard:
            self._cancel.add(op_id)

    def cancelled(self, op_id: uuid.UUID) -> bool:
        with self._guard:
            return op_id in self._cancel

    def _forget(self, op_id: uuid.UUID) -> None:
        with self._guard:
            self._cancel.discard(op_id)

    def cancel_operation(self, op_id: uuid.UUID) -> ops.Operation:
        """RPC 1.3: flag a running request-level operation; the operation as it is now.

        Raises ``jn.UnknownOperation`` (the caller maps it) or :class:`api.NotCancellable`.
        """
        op = self._j.get(op_id)
        if op.kind not in (ops.OperationKind.BACKUP, ops.OperationKind.RESTORE):
            raise api.NotCancellable(
                f"operation {op_id} is a {op.kind.value} operation: snapshot operations run "
                "to completion or roll back; they are not cancellable"
            )
        if not request_level(op):
            raise api.NotCancellable(
                f"operation {op_id} is one volume's part of a backup request: cancel the "
                "request's operation"
            )
        if op.state.is_final:
            raise api.NotCancellable(f"operation {op_id} already ended: {op.state.value}")
        self.cancel(op_id)
        now = self._j.get(op_id)
        if now.state.is_final:  # it ended meanwhile: nothing left to stop
            self._forget(op_id)
        return now

    def _finish_cancelled(self, op_id: uuid.UUID, result: dict[str, Any], what: str) -> None:
        err = ops.ErrorInfo("OperationCancelled", f"cancelled on request; {what}")
        self._j.finish(op_id, ops.OperationState.CANCELLED, result=result, error=err)

    def _stream_progress(self, report: Progress, cancel: Cancel) -> Progress:
        """``report`` plus the ``bandwidth_mib`` throttle: the engine calls this after each
        chunk on its reading thread, so sleeping here slows the reads themselves."""
        if self._s.bandwidth_mib <= 0:
            return report
        bucket = RateLimit(self._s.bandwidth_mib * bk.format.MiB)
        last = [0]

        def progress(done: int, total: int) -> None:
            report(done, total)
            bucket.take(max(0, done - last[0]), cancel)
            last[0] = done

        return progress

    # -- read-only ------------------------------------------------------------------------
    def list_backups(self, volume_id: str | None) -> list[dict[str, Any]]:
        repo = self._repo()
        if repo is None:
            return []
        with wire_errors():
            hs = repo.headers(volume_id)
        return [self._summary(h) for h in reversed(hs)]

    def get_backup(self, backup_id: str) -> dict[str, Any]:
        repo, m = self._find(backup_id)
        return {
            **self._summary(m),
            "stored_bytes": self._stored(repo, m),
            "kind": m.kind,
            "source_chain": [{"name": s.name, "format": s.fmt} for s in m.source_chain],
            "read_bytes": m.read_bytes,
            "fallback_reason": m.fallback_reason,
            "checkpoint_boundary": None if m.checkpoint is None else m.checkpoint.boundary,
            "checkpoint_snapshot_id": None if m.checkpoint is None else m.checkpoint.snapshot_id,
            "chunks": len(m.chunk_ids()),
            "extents": len(m.extents),
            "data_bytes": m.data_bytes(),
            "version": m.version,
        }

    # -- verify / delete ------------------------------------------------------------------
    def verify_backup(self, backup_id: str) -> ops.Operation:
        repo, m = self._find(backup_id)
        request = {"action": "verify", "backup_id": backup_id, "volume_ids": [m.volume_id]}
        op = self._j.begin(
            ops.OperationKind.BACKUP, request, locks=[f"volume:{m.volume_id}"]
        ).operation
        self._pool.submit(f"backup:{backup_id}", lambda: self._verify(op.id, repo, m))
        return op

    def _verify(self, op_id: uuid.UUID, repo: bk.Repository, m: bk.Manifest) -> None:
        ids = sorted(m.chunk_ids())
        bad: list[str] = []
        total = 0
        buf = bytearray(repo.config.chunk_size)
        try:
            step = self._j.step(op_id, StepName.VERIFY, {"backup_id": m.backup_id})
            with repo.reading(m), step as h:  # registered: GC and prune keep its chunks
                for n, cid in enumerate(ids, 1):
                    if self.cancelled(op_id):
                        raise bk.BackupCancelled(f"verify of {m.backup_id} cancelled")
                    try:
                        total += repo.read_chunk_into(cid, buf)
                    except bk.CorruptChunk as exc:  # MissingChunk too: name them all
                        LOG.warning("backup %s: %s", m.backup_id, exc)
                        bad.append(cid)
                    if n % 16 == 0 or n == len(ids):
                        self._j.set_progress(op_id, n, len(ids))
                h.data.update({"chunks": len(ids), "bad": len(bad)})
        except Exception as exc:
            if isinstance(exc, bk.BackupCancelled) and self.cancelled(op_id):
                part = {"backup_id": m.backup_id, "bad_chunks": bad, "chunks": len(ids)}
                self._finish_cancelled(op_id, part, "the backup was not fully verified")
            else:
                self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        finally:
            self._forget(op_id)
        result = {
            "backup_id": m.backup_id,
            "ok": not bad,
            "bad_chunks": bad,
            "chunks": len(ids),
            "bytes": total,
        }
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    def delete_backup(self, backup_id: str) -> None:
        repo, m = self._find(backup_id)
        if any(doc.get("parent_id") == backup_id for doc in repo.running()):
            raise api.DiskBusy(
                f"a running incremental builds on backup {backup_id}, or a restore or "
                "verify reads it"
            )
        with wire_errors():
            repo.delete(m.volume_id, backup_id)  # chunks go at the next prune's GC

    # -- restore --------------------------------------------------------------------------
    def _target(self, req: api.RestoreBackupRequest, m: bk.Manifest) -> tuple[str, list[int]]:
        """The restore's new file: under an allowed root, its directory real, not existing;
        and the directory's identity, which the worker requires again (a swap is refused)."""
        if req.to_path is not None:
            directory, name = os.path.split(req.to_path)
        else:
            assert req.volume_id is not None
            name = f"volume-{req.volume_id}"
            directory = self._s.restore_dir or self._source_dir(m)
        if not name or name.startswith("."):
            raise api.InvalidRequest(f"bad restore file name {name!r}")
        real = os.path.realpath(directory)
        if not _under(real, self._roots):
            raise api.InvalidRequest(f"{directory} is not under an allowed share root")
        if not os.path.isdir(real):
            raise api.InvalidRequest(f"{directory} is not a directory")
        try:
            ident = list(dir_identity(real))
        except (OSError, TargetChanged) as exc:
            raise api.InvalidRequest(f"{directory} is not a plain directory: {exc}") from None
        path = os.path.join(real, name)
        if os.path.lexists(path):
            raise api.InvalidRequest(f"restore target {path} exists")
        for op in self._j.list_operations(
            kind=ops.OperationKind.RESTORE,
            states=(ops.OperationState.PENDING, ops.OperationState.RUNNING),
        ):
            if op.request.get("path") == path:
                raise api.InvalidRequest(f"restore {op.id} already writes {path}")
        return path, ident

    def _source_dir(self, m: bk.Manifest) -> str:
        try:
            return os.path.dirname(self._hv.locate(m.volume_id).disk.source)
        except api.VolumeNotFound:
            raise api.InvalidRequest(
                f"volume {m.volume_id} is not attached here and [backup] restore_dir is "
                "not set: give to_path"
            ) from None

    def restore_backup(self, req: api.RestoreBackupRequest) -> ops.Operation:
        repo, m = self._find(req.backup_id)
        path, ident = self._target(req, m)
        vols = sorted({m.volume_id, req.volume_id or m.volume_id})
        request = {
            "action": "restore",
            "backup_id": req.backup_id,
            "path": path,
            "dir": ident,
            "fmt": req.fmt,
            "volume_ids": vols,
        }
        op = self._j.begin(
            ops.OperationKind.RESTORE, request, locks=[f"volume:{v}" for v in vols]
        ).operation
        run = functools.partial(self._restore, op.id, repo, m, path, req.fmt, (ident[0], ident[1]))
        self._pool.submit(f"restore:{path}", run)
        return op

    def _restore(
        self,
        op_id: uuid.UUID,
        repo: bk.Repository,
        m: bk.Manifest,
        path: str,
        fmt: str,
        ident: tuple[int, int],
    ) -> None:
        def progress(done: int, total: int) -> None:
            with contextlib.suppress(jn.JournalError):
                self._j.set_progress(op_id, done, total)

        try:
            with self._j.step(op_id, StepName.RESTORE, {"path": path, "fmt": fmt}) as h:
                res = bk.restore(
                    repo,
                    m.backup_id,
                    path,
                    fmt=fmt,
                    volume_id=m.volume_id,
                    progress=progress,
                    cancel=lambda: self.cancelled(op_id),
                    expect_dir=ident,
                )
                h.data["bytes_written"] = res.bytes_written
        except Exception as exc:
            if isinstance(exc, bk.BackupCancelled) and self.cancelled(op_id):
                done = {"backup_id": m.backup_id, "path": None}
                self._finish_cancelled(op_id, done, f"nothing was written to {path}")
            else:
                self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
            return
        finally:
            self._forget(op_id)
        result = {
            "backup_id": m.backup_id,
            "path": res.path,
            "format": res.fmt,
            "virtual_size": res.virtual_size,
            "bytes_written": res.bytes_written,
            "chunks": res.chunks,
        }
        self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)

    # -- prune ----------------------------------------------------------------------------
    def _policy(self, req: api.PruneBackupsRequest) -> bk.RetentionPolicy:
        last, daily = req.keep_last, req.keep_daily
        if last is None and daily is None:
            last = self._s.keep_last
        try:
            return bk.RetentionPolicy(keep_last=last or 0, keep_daily=daily or 0)
        except ValueError as exc:
            raise api.InvalidRequest(str(exc)) from None

    @staticmethod
    def _prune_result(res: bk.PruneResult | None) -> dict[str, Any]:
        if res is None:  # no repository yet: nothing to prune
            return {"deleted": [], "kept": [], "pinned": [], "chunks_removed": 0, "bytes_freed": 0}
        return {
            "deleted": list(res.deleted),
            "kept": list(res.kept),
            "pinned": list(res.pinned),
            "chunks_removed": res.gc.removed if res.gc else 0,
            "bytes_freed": res.gc.bytes_freed if res.gc else 0,
        }

    def prune_backups(self, req: api.PruneBackupsRequest) -> dict[str, Any]:
        """RPC 1.2: prune within the call (kept for 1.2 clients; 1.3 has start_prune)."""
        policy = self._policy(req)
        repo = self._repo()
        if repo is None:
            return self._prune_result(None)
        with wire_errors():
            res = bk.prune(repo, policy, volume_id=req.volume_id, dry_run=req.dry_run, wait=30.0)
        return self._prune_result(res)

    def start_prune(self, req: api.PruneBackupsRequest) -> ops.Operation:
        """RPC 1.3: the same prune as an operation (kind backup, ``action`` prune) in the
        pool: progress per manifest judged then per chunk file scanned, cancellable."""
        policy = self._policy(req)
        request = {
            "action": "prune",
            "keep_last": policy.keep_last,
            "keep_daily": policy.keep_daily,
            "volume_id": req.volume_id,
            "dry_run": req.dry_run,
        }
        op = self._j.begin(ops.OperationKind.BACKUP, request).operation
        self._pool.submit("backup:prune", lambda: self._prune(op.id, policy, req))
        return op

    def _prune(
        self, op_id: uuid.UUID, policy: bk.RetentionPolicy, req: api.PruneBackupsRequest
    ) -> None:
        def progress(phase: str, done: int, total: int) -> None:
            with contextlib.suppress(jn.JournalError):
                self._j.set_progress(op_id, done, total)

        try:
            with self._j.step(op_id, StepName.PRUNE, {"volume_id": req.volume_id}) as h:
                repo = self._repo()
                res = None
                if repo is not None:
                    with wire_errors():
                        res = bk.prune(
                            repo,
                            policy,
                            volume_id=req.volume_id,
                            dry_run=req.dry_run,
                            wait=30.0,
                            progress=progress,
                            cancel=lambda: self.cancelled(op_id),
                        )
                result = self._prune_result(res)
                h.data.update(
                    {"deleted": len(result["deleted"]), "cancelled": bool(res and res.cancelled)}
                )
            if res is not None and res.cancelled:
                gone = len(result["deleted"])
                self._finish_cancelled(
                    op_id, result, f"{gone} backup(s) deleted before it stopped stay deleted"
                )
            else:
                self._j.finish(op_id, ops.OperationState.SUCCEEDED, result=result)
        except Exception as exc:
            self._j.finish(op_id, ops.OperationState.FAILED, error=exc)
        finally:
            self._forget(op_id)


#: Decides one volume's interrupted online backup (``online.recover_backup``).
RecoverVolume = Callable[[ops.OperationRecord], str]


def resume(
    journal: jn.Journal, rec: ops.OperationRecord, recover_volume: RecoverVolume | None
) -> str:
    """Recovery of a backup/restore operation after a restart; the decision.

    One volume's online backup: decided by ``recover_volume`` (without it the operation
    stays unfinished for the next start). A request-level backup, verify, prune
    or restore is failed as interrupted (its volumes' own operations say what happened to
    each); an interrupted restore's temporary files are removed: the target never appears
    half written.
    """
    op, steps = rec.operation, rec.steps
    if "action" not in op.request:  # one volume's online backup
        if recover_volume is None:
            raise RuntimeError("no backup recovery configured; left for the next start")
        return recover_volume(rec)
    for s in steps:
        if s.state is ops.StepState.PLANNED:
            journal.step_undone(op.id, s.seq, {"recovery": "interrupted by a restart"})
    if op.request.get("action") == "restore":
        remove_partial(str(op.request.get("path", "")))
    done = [s.data for s in steps if s.name == StepName.VOLUME and s.state is ops.StepState.DONE]
    why = f"{op.request.get('action')} interrupted by a restart"
    result = {"backups": done} if done else None
    journal.finish(op.id, ops.OperationState.FAILED, result=result, error=RuntimeError(why))
    return f"failed: {why}"
