"""Online backup of a volume attached to a running guest: frozen layers only, journaled.

One backup, every step journaled (PLANNED) before it acts::

    chain before:        A (active)                 or  A <- K_old (checkpoint, active)
    1 snapshot:          A <- K_new                     A <- K_old <- K_new    (quiesced)
    2 read (engine):     frozen view at A               frozen view at K_old, incremental:
                                                        only clusters allocated in K_old
    3 merge:             -                              commit K_old into A (inner commit)
    4 remove:            -                              unlink K_old
    chain after:         A <- K_new (checkpoint)        A <- K_new (checkpoint)
    (keep_checkpoint=False: 5 active commit K_new into A + pivot, 6 unlink K_new -> A)

``K`` files are ``volume-<vid>.qsnap-bk-<backup-id>``. They never enter Cinder's ``.info``;
while a checkpoint overlay is the live top, Cinder's ledger still names ``A`` as active,
so the agent must :func:`release_checkpoint` before serving a Cinder snapshot of that
volume (or a detach). The published manifest records the checkpoint (overlay, boundary);
the next backup is incremental only if that overlay is still the live top directly over
that boundary, otherwise it reads everything (deduplicated) and says why.

A kill at any point leaves no visible partial backup (the manifest is published last) and
:func:`recover_backup` puts the chain back from the journal and the live chain.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import libvirt

import libvirt_ops as lo
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
from hostagent.journal.crash import crash_point
from hostagent.journal.model import (
    Operation,
    OperationKind,
    OperationRecord,
    OperationState,
    StepName,
    StepState,
)
from hostagent.journal.store import Journal
from qcow2 import Qcow2Error, QemuImgError, inspect_chain
from qcow2.naming import DEFAULT_IMAGE_PATTERN, Naming, is_uuid

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: Cinder's names plus our temporary/checkpoint overlays (the only naming that accepts them).
BACKUP_NAMING = Naming(
    image_pattern=rf"(?:{DEFAULT_IMAGE_PATTERN})|volume-{_UUID}\.qsnap-bk-{_UUID}"
)
_BK = re.compile(rf"volume-({_UUID})\.qsnap-bk-({_UUID})")
#: Bound on settling a block job a killed agent left on the disk (see :func:`_put_back`).
SETTLE_TIMEOUT = 600.0


def overlay_name(volume_id: str, backup_key: str) -> str:
    return f"volume-{volume_id}.qsnap-bk-{backup_key}"


def is_backup_overlay(name: str, volume_id: str) -> bool:
    m = _BK.fullmatch(name)
    return m is not None and m.group(1) == volume_id


def overlay_volume(name: str) -> str | None:
    """The volume id a checkpoint overlay's name carries (None: not such a name)."""
    m = _BK.fullmatch(name)
    return m.group(1) if m is not None else None


@dataclass(frozen=True)
class BackupRequest:
    """One volume's backup.

    ``incremental``: build on the previous backup's checkpoint if it is intact (else a full
    read with dedup; ``result.fallback_reason`` says why) and, unless ``keep_checkpoint``
    is False, leave a checkpoint overlay as the live top for the next one. The default is a
    plain backup that leaves the chain exactly as it was: a checkpoint overlay is invisible
    to Cinder and Nova, so the agent must :func:`release_checkpoint` before a Cinder
    snapshot, a detach or a Nova hard reboot of that volume (see the README).
    """

    domain: str
    volume_id: str
    repository: str
    incremental: bool = False
    keep_checkpoint: bool | None = None  # None: keep one iff incremental
    quiesce: lo.QuiescePolicy = lo.QuiescePolicy.PREFER

    @property
    def keeps_checkpoint(self) -> bool:
        return self.incremental if self.keep_checkpoint is None else self.keep_checkpoint


@dataclass(frozen=True)
class OnlineBackupResult:
    operation_id: str
    result: BackupResult
    quiesced: bool
    checkpoint: str | None  # the overlay left as live top, if any
    chain_after: tuple[str, ...]

    @property
    def incremental(self) -> bool:
        return self.result.manifest.kind == "incremental"


class ChainChanged(BackupError):
    """The live chain is not what the backup expects (someone else touched it)."""


class VolumeBusy(BackupError):
    """Another journaled operation on this volume is unfinished (or awaits recovery)."""


def _names(disk: lo.Disk) -> list[str]:
    return [os.path.basename(layer.path) for layer in disk.chain]


def _latest(repo: Repository, volume_id: str) -> Manifest | None:
    """The volume's newest backup, whole (the headers pick it; only it is loaded)."""
    hs = repo.headers(volume_id)
    return repo.load(volume_id, hs[-1].backup_id) if hs else None


def backup_volume(
    conn: lo.Connection,
    journal: Journal,
    req: BackupRequest,
    *,
    roots: Sequence[str] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    not_busy: Callable[[Operation], bool] | None = None,
) -> OnlineBackupResult:
    """Back up ``req.volume_id`` of the running ``req.domain`` (see the module docstring).

    The caller must hold the agent's per-disk lock for the volume (the service's
    ``DiskLocks``) so no snapshot operation changes the chain meanwhile.
    ``roots``: directories the chain may live in (default: the active file's directory).
    Raises :class:`hostagent.backup.BackupError` subclasses, ``libvirt_ops`` errors or
    ``qcow2`` errors; on any error the chain is put back before the error propagates.
    ``not_busy``: unfinished operations it accepts do not make the volume busy (the agent's
    request-level backup/restore operations, which never touch the chain themselves).
    """
    if not is_uuid(req.volume_id):
        raise ValueError(f"bad volume id {req.volume_id!r}")
    repo = Repository.open(req.repository)
    dom = conn.lookup(req.domain)
    disk = lo.find_disk(dom, volume_id=req.volume_id)
    share = os.path.dirname(disk.source)
    rts = list(roots) if roots is not None else [share]
    before = _names(disk)
    key = str(uuid.uuid4())
    k_new = overlay_name(req.volume_id, key)
    k_old = before[0] if is_backup_overlay(before[0], req.volume_id) else None
    if k_old is not None and len(before) < 2:
        raise ChainChanged(f"checkpoint overlay {k_old} has no backing file")
    boundary = before[1] if k_old is not None else before[0]
    request = {
        "domain": req.domain,
        "volume_id": req.volume_id,
        "repository": repo.path,
        "incremental": req.incremental,
        "keep_checkpoint": req.keeps_checkpoint,
        "target": disk.target,
        "chain_before": before,
        "overlay": k_new,
        "old_checkpoint": k_old,
        "boundary": boundary,
    }
    lock = f"volume:{req.volume_id}"
    busy = journal.list_operations(
        states=(OperationState.PENDING, OperationState.RUNNING), lock=lock
    )
    busy = [b for b in busy if not_busy is None or not not_busy(b)]
    if busy:  # the caller's per-disk lock is the real exclusion; this catches a forgotten one
        raise VolumeBusy(f"volume {req.volume_id} has unfinished {busy[0].kind} {busy[0].id}")
    op = journal.begin(OperationKind.BACKUP, request, locks=[lock]).operation
    try:
        return _run(
            conn, journal, op.id, req, repo, disk, rts, k_new, k_old, boundary, progress, cancel
        )
    except BaseException as exc:
        if isinstance(exc, Exception):
            try:
                decision = _put_back(conn, journal, op.id, request, rts)
            except Exception as again:  # recovery at the next start retries
                decision = f"put back failed: {again}"
            # a cancel is the caller's decision, not a failure (``ops list --state``)
            cancelled = isinstance(exc, BackupCancelled)
            state = OperationState.CANCELLED if cancelled else OperationState.FAILED
            journal.finish(op.id, state, error=exc)
            exc.add_note(f"chain: {decision}")
        raise


def _run(
    conn: lo.Connection,
    journal: Journal,
    op: uuid.UUID,
    req: BackupRequest,
    repo: Repository,
    disk: lo.Disk,
    roots: list[str],
    k_new: str,
    k_old: str | None,
    boundary: str,
    progress: Progress | None,
    cancel: Cancel | None,
) -> OnlineBackupResult:
    share = os.path.dirname(disk.source)
    spec = lo.DiskSnapshotSpec(new_file=k_new, volume_id=req.volume_id)
    snap_req = lo.SnapshotRequest(
        domain=req.domain, disks=(spec,), quiesce=req.quiesce, naming=BACKUP_NAMING
    )
    with journal.step(op, StepName.SNAPSHOT, {"overlay": k_new}) as h:
        snap = lo.take_snapshot(conn, snap_req, roots=roots)
        h.data["quiesced"] = snap.quiesced

    frozen = os.path.join(share, k_old if k_old is not None else boundary)
    parent = _latest(repo, req.volume_id)
    cp = Checkpoint(k_new, boundary) if req.keeps_checkpoint else None
    reason: str | None = None
    if not req.incremental:
        reason = None
    elif parent is None:
        reason = "no previous backup of this volume"
    elif parent.checkpoint is None:
        reason = f"previous backup {parent.backup_id} left no checkpoint"
    elif k_old is None or parent.checkpoint.overlay != k_old:
        reason = (
            f"checkpoint overlay {parent.checkpoint.overlay} of backup {parent.backup_id} "
            "is no longer the live top (merged by a snapshot operation or released)"
        )
    elif parent.checkpoint.boundary != boundary:
        reason = f"checkpoint boundary {parent.checkpoint.boundary} is no longer under {k_old}"
    with journal.step(op, StepName.READ, {"frozen": os.path.basename(frozen)}) as h:
        prog = _journaled_progress(journal, op, progress)
        res = _read(req, repo, disk, roots, frozen, parent, boundary, reason, cp, prog, cancel)
        h.data["backup_id"] = res.manifest.backup_id
    dom = conn.lookup(req.domain)
    if k_old is not None:
        with journal.step(op, StepName.MERGE, {"kind": "commit", "top": k_old, "base": boundary}):
            lo.commit(conn, dom, disk.target, top=k_old, roots=roots, naming=BACKUP_NAMING)
        _remove(journal, op, share, k_old, conn, req.domain, disk.target)
    if not req.keeps_checkpoint:
        with journal.step(op, StepName.MERGE, {"kind": "active_commit", "top": k_new}):
            lo.active_commit(conn, dom, disk.target, roots=roots, naming=BACKUP_NAMING)
        _remove(journal, op, share, k_new, conn, req.domain, disk.target)
    after = _names(lo.find_disk(conn.lookup(req.domain), volume_id=req.volume_id))
    result = {
        "backup_id": res.manifest.backup_id,
        "kind": res.manifest.kind,
        "bytes_read": res.bytes_read,
        "fallback_reason": res.fallback_reason,
        "chain_after": after,
    }
    journal.finish(op, OperationState.SUCCEEDED, result=result)
    return OnlineBackupResult(
        str(op), res, snap.quiesced, k_new if req.keeps_checkpoint else None, tuple(after)
    )


def _read(
    req: BackupRequest,
    repo: Repository,
    disk: lo.Disk,
    roots: list[str],
    frozen: str,
    parent: Manifest | None,
    boundary: str,
    reason: str | None,
    cp: Checkpoint | None,
    progress: Progress | None,
    cancel: Cancel | None,
) -> BackupResult:
    if req.incremental and reason is None and parent is not None:
        return backup_incremental(
            frozen,
            "qcow2",
            roots,
            repo,
            req.volume_id,
            parent,
            boundary,
            naming=BACKUP_NAMING,
            progress=progress,
            cancel=cancel,
            parent_boundary=boundary,
            checkpoint=cp,
        )
    return backup_full(
        frozen,
        _fmt(disk, os.path.basename(frozen)),
        roots,
        repo,
        req.volume_id,
        naming=BACKUP_NAMING,
        progress=progress,
        cancel=cancel,
        parent=parent if req.incremental else None,
        fallback_reason=reason if req.incremental else None,
        checkpoint=cp,
    )


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


def _fmt(disk: lo.Disk, name: str) -> str:
    for layer in disk.chain:
        if os.path.basename(layer.path) == name:
            return layer.fmt
    return "qcow2"


def _remove(
    journal: Journal,
    op: uuid.UUID,
    share: str,
    name: str,
    conn: lo.Connection,
    domain: str,
    target: str,
) -> None:
    """Unlink a merged-away overlay, but never a file still in the live chain."""
    with journal.step(op, StepName.REMOVE, {"file": name}):
        live = _names(lo.resolve_disk(conn.lookup(domain), target))
        if name in live:
            raise ChainChanged(f"{name} is still in the live chain {live}: not removed")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(share, name))


# --- putting the chain back (after an error, or after a restart) ------------------------


def _put_back(
    conn: lo.Connection,
    journal: Journal,
    op: uuid.UUID,
    request: dict[str, object],
    roots: Sequence[str],
) -> str:
    """Bring the live chain back to a state consistent with the repository.

    If the backup was published its checkpoint is honoured (only the old checkpoint is
    merged away); otherwise the chain goes back to exactly ``chain_before``. A block job a
    killed agent left on the disk (a merge step mid-job) is settled first, so the chain is
    judged after that merge's intended end instead of while it still moves.
    """
    domain, target = str(request["domain"]), str(request["target"])
    k_new, k_old = str(request["overlay"]), request.get("old_checkpoint")
    keep = bool(request.get("keep_checkpoint", True))
    dom = conn.lookup(domain)
    if not dom.isActive():
        return "domain not running: chain left for an offline repair"
    disk = lo.resolve_disk(dom, target)
    share = os.path.dirname(disk.source)
    rts = list(roots) or [share]
    done: list[str] = []
    settled = _settle_left_job(conn, dom, target, rts)
    if settled is not None:
        done.append(settled)
        disk = lo.resolve_disk(dom, target)
    live = _names(disk)
    published = any(
        s.name == StepName.READ and s.state is StepState.DONE for s in journal.steps(op)
    )
    if k_new in live and live[0] == k_new and (not published or not keep):
        with journal.step(
            op, StepName.MERGE, {"kind": "active_commit", "top": k_new, "recovery": 1}
        ):
            lo.active_commit(conn, dom, target, roots=rts, naming=BACKUP_NAMING)
        done.append(f"active-committed {k_new}")
    if published and isinstance(k_old, str) and k_old in _names(lo.resolve_disk(dom, target)):
        now = _names(lo.resolve_disk(dom, target))
        if now[0] != k_old:
            with journal.step(op, StepName.MERGE, {"kind": "commit", "top": k_old, "recovery": 1}):
                lo.commit(conn, dom, target, top=k_old, roots=rts, naming=BACKUP_NAMING)
            done.append(f"committed {k_old}")
    now = _names(lo.resolve_disk(dom, target))
    for name in (k_new, k_old):
        if isinstance(name, str) and name not in now:
            path = os.path.join(share, name)
            if os.path.exists(path) and (name == k_new or published):
                with journal.step(op, StepName.REMOVE, {"file": name, "recovery": 1}):
                    os.unlink(path)
                done.append(f"removed {name}")
    return "; ".join(done) or "chain already consistent"


def _settle_left_job(
    conn: lo.Connection, dom: libvirt.virDomain, target: str, roots: list[str]
) -> str | None:
    """Settle a job a killed agent left on the disk (our merge step mid-job); what it did."""
    res = lo.settle_block_job(
        conn, dom, target, timeout=SETTLE_TIMEOUT, roots=roots, naming=BACKUP_NAMING
    )
    if res.found is None:
        return None
    how = "pivoted" if res.pivoted else f"ended {res.end.name if res.end else '?'}"
    return f"settled a {res.found.name} job left on {target} ({how})"


def recover_backup(
    journal: Journal,
    conn: lo.Connection,
    record: OperationRecord,
    *,
    roots: Sequence[str] = (),
) -> str:
    """Recovery hook for an unfinished ``OperationKind.BACKUP`` (wire into
    ``recovery.reconcile``): put the live chain back, finish the operation FAILED (or
    SUCCEEDED if its manifest was published and the chain is consistent), return what
    was decided. Idempotent: a crash during recovery is recovered again at the next start.
    """
    op = record.operation
    if op.kind is not OperationKind.BACKUP:
        raise ValueError(f"{op.kind} is not a backup")
    request = dict(op.request)
    for s in record.steps:
        if s.state is StepState.PLANNED:
            journal.step_undone(op.id, s.seq, {"recovery": "interrupted; judged from the chain"})
    decision = _put_back(conn, journal, op.id, request, roots)
    published = [s for s in record.steps if s.name == StepName.READ and s.state is StepState.DONE]
    if published:
        journal.finish(
            op.id,
            OperationState.SUCCEEDED,
            result={"backup_id": published[-1].data.get("backup_id"), "recovered": decision},
        )
    else:
        err = RuntimeError(f"backup interrupted by a restart; {decision}")
        journal.finish(op.id, OperationState.FAILED, error=err)
    return decision


def release_checkpoint(
    conn: lo.Connection,
    domain: str,
    volume_id: str,
    *,
    roots: Sequence[str] = (),
) -> str | None:
    """Merge a checkpoint overlay of ``volume_id`` down (active commit + pivot, unlink),
    so the live top is Cinder's active file again. Call before a Cinder snapshot of the
    volume and before a detach. The next backup then reads everything (deduplicated).
    Returns the released overlay's name, or None if there was none."""
    dom = conn.lookup(domain)
    disk = lo.find_disk(dom, volume_id=volume_id)
    top = os.path.basename(disk.source)
    if not is_backup_overlay(top, volume_id):
        return None
    share = os.path.dirname(disk.source)
    # test-only: a kill -9 with the job running (crash_point is inert unless its env is set)
    opts = lo.JobOptions(started=lambda: crash_point("release_checkpoint", "job"))
    rts = list(roots) or [share]
    lo.active_commit(conn, dom, disk.target, roots=rts, naming=BACKUP_NAMING, options=opts)
    live = _names(lo.resolve_disk(dom, disk.target))
    if top not in live:
        os.unlink(os.path.join(share, top))
    return top


def release_checkpoint_offline(
    directory: str, volume_id: str, *, roots: Sequence[str] = ()
) -> list[str]:
    """Merge down every checkpoint overlay of a volume no running guest uses (after a
    detach or a stop), so Cinder's active file holds all the data again.

    Each overlay's whole chain is inspected first; one that another file backs onto (not a
    top) is refused. ``qemu-img commit`` takes QEMU's write lock, so an image still open
    by a guest is refused too. Returns the released overlays' names.
    """
    if not is_uuid(volume_id):
        raise ValueError(f"bad volume id {volume_id!r}")
    rts = list(roots) or [directory]
    files = sorted(n for n in os.listdir(directory) if n.startswith(f"volume-{volume_id}"))
    released: list[str] = []
    for name in files:
        if not is_backup_overlay(name, volume_id):
            continue
        path = os.path.join(directory, name)
        for other in files:
            if other == name or not BACKUP_NAMING.is_image_name(other):
                continue
            try:
                with inspect_chain(
                    os.path.join(directory, other), roots=rts, naming=BACKUP_NAMING
                ) as chain:
                    if chain.layers[0].backing_name == name:
                        raise ChainChanged(f"{other} backs onto {name}: not a top, not released")
            except Qcow2Error:
                continue  # raw base or not ours to judge: it cannot back onto an overlay
        with inspect_chain(path, roots=rts, naming=BACKUP_NAMING):
            pass
        argv = ["qemu-img", "commit", "-q", "-f", "qcow2", path]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise QemuImgError(argv, proc.returncode, proc.stderr)
        os.unlink(path)
        released.append(name)
    return released
