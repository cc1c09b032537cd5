"""Merge layers of a running disk's chain with block jobs, and prove the result.

Three verbs, each picked for the least copying: ``active_commit`` folds the active layer
into its backing file and pivots (copies only the overlay, where Nova pulls the WHOLE base
to delete the newest snapshot); ``commit`` folds an inner layer into its base; ``pull``
streams layers between the active file and a base into the active file (``flatten``: all).

Every job is checked twice: the chain is inspected by qcow2/ before anything starts (names
from callers are validated against the real chain), and after the job the live XML and the
files' headers must show exactly the expected chain with plain relative backing names. A
job that failed, was cancelled, vanished with a different chain, or left another chain is
:class:`BlockJobFailed`. Merged-away files are NOT deleted: Cinder deletes them itself.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import libvirt

import qcow2
from libvirt_ops._blockjob import BlockJob, JobEnd, JobOptions, JobType
from libvirt_ops._connection import Connection
from libvirt_ops._domain import ChainLayer, Disk, domain_disks
from libvirt_ops.errors import BlockJobFailed, DiskNotFound, LibvirtOpsError


class ChainMismatch(LibvirtOpsError):
    """libvirt's view of a disk's chain disagrees with the files' headers (before a job)."""


class MergeKind(enum.Enum):
    ACTIVE_COMMIT = "active-commit"
    COMMIT = "commit"
    PULL = "pull"
    FLATTEN = "flatten"


@dataclass(frozen=True)
class MergeResult:
    """What a merge did. ``merged_away`` files left the chain and still exist on disk."""

    kind: MergeKind
    disk: str
    chain_before: tuple[str, ...]
    chain_after: tuple[str, ...]
    merged_away: tuple[str, ...]
    #: libvirt's job size (``end``) last seen: for active commit, the bytes mirrored.
    job_bytes: int | None
    #: The job's end event was lost (libvirtd restart); success was decided by the chain.
    event_lost: bool
    seconds: float

    @property
    def active(self) -> str:
        return self.chain_after[0]


@dataclass(frozen=True)
class _Plan:
    kind: MergeKind
    job_type: JobType
    disk: Disk
    expected: tuple[str, ...]
    merged_away: tuple[str, ...]
    start: Callable[[libvirt.virDomain], object]


def resolve_disk(dom: libvirt.virDomain, disk: str) -> Disk:
    """The disk named by target (``vda``) or by volume id (its ``<serial>``)."""
    disks = domain_disks(dom)
    for d in disks:
        if d.target == disk:
            return d
    for d in disks:
        if d.serial is not None and d.serial == disk:
            return d
    raise DiskNotFound(f"domain {dom.name()} has no disk {disk!r} (target or volume id)")


def resolve_layer(disk: Disk, name: str) -> tuple[int, ChainLayer]:
    """Position and layer of ``name`` (a basename, or a path) in the disk's real chain."""
    if "/" in name:
        want = os.path.realpath(name)
        hits = [(i, lay) for i, lay in enumerate(disk.chain) if os.path.realpath(lay.path) == want]
    else:
        hits = [(i, lay) for i, lay in enumerate(disk.chain) if os.path.basename(lay.path) == name]
    if len(hits) != 1:
        raise DiskNotFound(f"{name!r} is not (exactly once) in the chain of {disk.target}")
    return hits[0]


def _paths(layers: Sequence[ChainLayer]) -> tuple[str, ...]:
    return tuple(os.path.realpath(lay.path) for lay in layers)


def _inspect(disk: Disk, roots: Sequence[str], naming: qcow2.Naming) -> tuple[str, ...]:
    """Inspect the whole chain from its top (qcow2's policy); return the files' own chain."""
    chain = qcow2.inspect_chain(disk.source, roots=roots, naming=naming, fmt=disk.fmt)
    chain.close()
    return tuple(info.path for info in chain.layers)


def _prepare(disk: Disk, roots: Sequence[str], naming: qcow2.Naming) -> None:
    if not disk.snapshot_capable:
        raise ChainMismatch(f"disk {disk.target} is read-only or shareable")
    on_disk = _inspect(disk, roots, naming)
    if on_disk != _paths(disk.chain):
        raise ChainMismatch(
            f"disk {disk.target}: libvirt's chain {_paths(disk.chain)} differs from the "
            f"files' headers {on_disk}"
        )


def _bw_flags(options: JobOptions, flag: int) -> int:
    return flag if options.bandwidth else 0


def plan_active_commit(disk: Disk, base: str | None, options: JobOptions) -> _Plan:
    """Fold the active layer (and any layers down to ``base``) into ``base``, then pivot."""
    if len(disk.chain) < 2:
        raise DiskNotFound(f"disk {disk.target} has no backing file to commit into")
    pos, layer = (1, disk.chain[1]) if base is None else resolve_layer(disk, base)
    if pos < 1:
        raise ValueError("the base of an active commit must be below the active layer")
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
    flags |= _bw_flags(options, libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES)
    # Always name the base: libvirt reads base=None as the BOTTOM of the chain, not the
    # active layer's backing file (a whole-chain commit that the check below once caught).
    base_addr = disk.address(layer)
    target, bw = disk.target, options.bandwidth
    return _Plan(
        MergeKind.ACTIVE_COMMIT,
        JobType.ACTIVE_COMMIT,
        disk,
        _paths(disk.chain[pos:]),
        _paths(disk.chain[:pos]),
        lambda dom: dom.blockCommit(target, base_addr, None, bw, flags),
    )


def plan_commit(disk: Disk, top: str, base: str | None, options: JobOptions) -> _Plan:
    """Fold inner layer ``top`` (and layers down to ``base``) into ``base``."""
    top_pos, top_layer = resolve_layer(disk, top)
    if top_pos == 0:
        raise ValueError(f"{top!r} is the active layer: use active_commit")
    if base is None:
        if top_pos + 1 >= len(disk.chain):
            raise DiskNotFound(f"{top!r} has no backing file to commit into")
        base_pos, base_layer = top_pos + 1, disk.chain[top_pos + 1]
    else:
        base_pos, base_layer = resolve_layer(disk, base)
    if base_pos <= top_pos:
        raise ValueError(f"base {base!r} is not below top {top!r}")
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
    flags |= _bw_flags(options, libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES)
    base_addr, top_addr = disk.address(base_layer), disk.address(top_layer)
    target, bw = disk.target, options.bandwidth
    return _Plan(
        MergeKind.COMMIT,
        JobType.COMMIT,
        disk,
        _paths(disk.chain[:top_pos] + disk.chain[base_pos:]),
        _paths(disk.chain[top_pos:base_pos]),
        lambda dom: dom.blockCommit(target, base_addr, top_addr, bw, flags),
    )


def plan_pull(disk: Disk, base: str | None, options: JobOptions) -> _Plan:
    """Stream the layers above ``base`` into the active layer (all of them when None)."""
    if base is None:
        if len(disk.chain) < 2:
            raise DiskNotFound(f"disk {disk.target} has nothing to flatten")
        pos, base_addr, kind = len(disk.chain), None, MergeKind.FLATTEN
        flags = 0
    else:
        pos, layer = resolve_layer(disk, base)
        if pos < 2:
            raise ValueError(f"{base!r} is the active layer or its backing file: nothing to pull")
        base_addr, kind = disk.address(layer), MergeKind.PULL
        flags = libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE
    flags |= _bw_flags(options, libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES)
    target, bw = disk.target, options.bandwidth
    return _Plan(
        kind,
        JobType.PULL,
        disk,
        _paths(disk.chain[:1] + disk.chain[pos:]),
        _paths(disk.chain[1:pos]),
        lambda dom: dom.blockRebase(target, base_addr, bw, flags),
    )


def _verify(
    job: BlockJob, plan: _Plan, roots: Sequence[str], naming: qcow2.Naming
) -> tuple[str, ...]:
    """The chain after the job, from the live XML and the headers, must be the expected one."""
    if job.info():
        raise BlockJobFailed(f"{job!r}: a job is still present on the disk after it ended")
    disk = resolve_disk(job.domain(), plan.disk.target)
    live = _paths(disk.chain)
    if live != plan.expected:
        raise BlockJobFailed(f"{job!r} left chain {live}, expected {plan.expected}")
    try:
        on_disk = _inspect(disk, roots, naming)  # also: every backing name a plain basename
    except qcow2.Qcow2Error as exc:
        raise BlockJobFailed(f"{job!r} left an unsafe chain: {exc}") from exc
    if on_disk != plan.expected:
        raise BlockJobFailed(f"{job!r}: file headers chain {on_disk}, expected {plan.expected}")
    return live


def _run(
    conn: Connection,
    dom: libvirt.virDomain,
    plan: _Plan,
    roots: Sequence[str],
    naming: qcow2.Naming,
    options: JobOptions,
) -> MergeResult:
    t0 = time.monotonic()
    with BlockJob(conn, dom, plan.disk.target, plan.job_type, options) as job:
        now = resolve_disk(job.domain(), plan.disk.target)
        if now.chain != plan.disk.chain:
            raise ChainMismatch(f"chain of {now.target} changed while the merge was planned")
        _prepare(plan.disk, roots, naming)
        job.start(plan.start)
        if plan.job_type is JobType.ACTIVE_COMMIT:
            end = job.wait(frozenset({JobEnd.READY}))
            if end is JobEnd.READY:
                job.snapshot_info()
                job.pivot()
                end = job.wait(frozenset({JobEnd.COMPLETED}))
        else:
            end = job.wait(frozenset({JobEnd.COMPLETED}))
        if end in (JobEnd.FAILED, JobEnd.CANCELED):
            raise BlockJobFailed(f"{job!r} ended {end.name}; chain left as it was")
        chain_after = _verify(job, plan, roots, naming)  # also decides a VANISHED job
    return MergeResult(
        kind=plan.kind,
        disk=plan.disk.target,
        chain_before=_paths(plan.disk.chain),
        chain_after=chain_after,
        merged_away=plan.merged_away,
        job_bytes=job.last_end,
        event_lost=job.event_lost,
        seconds=time.monotonic() - t0,
    )


def active_commit(
    conn: Connection,
    dom: libvirt.virDomain,
    disk: str,
    *,
    roots: Sequence[str],
    base: str | None = None,
    naming: qcow2.Naming = qcow2.CINDER,
    options: JobOptions | None = None,
) -> MergeResult:
    """Delete the newest snapshot the cheap way: commit the active layer into its backing
    file (or ``base``) and pivot the disk onto it. ``disk`` is a target or a volume id."""
    opts = options or JobOptions()
    plan = plan_active_commit(resolve_disk(dom, disk), base, opts)
    return _run(conn, dom, plan, roots, naming, opts)


def commit(
    conn: Connection,
    dom: libvirt.virDomain,
    disk: str,
    *,
    top: str,
    roots: Sequence[str],
    base: str | None = None,
    naming: qcow2.Naming = qcow2.CINDER,
    options: JobOptions | None = None,
) -> MergeResult:
    """Commit inner layer ``top`` into ``base`` (default: its backing file); the layer above
    ``top`` gets ``base`` as its (relative) backing file."""
    opts = options or JobOptions()
    plan = plan_commit(resolve_disk(dom, disk), top, base, opts)
    return _run(conn, dom, plan, roots, naming, opts)


def pull(
    conn: Connection,
    dom: libvirt.virDomain,
    disk: str,
    *,
    base: str,
    roots: Sequence[str],
    naming: qcow2.Naming = qcow2.CINDER,
    options: JobOptions | None = None,
) -> MergeResult:
    """Rebase the active layer onto ``base``, copying in the layers between them."""
    opts = options or JobOptions()
    plan = plan_pull(resolve_disk(dom, disk), base, opts)
    return _run(conn, dom, plan, roots, naming, opts)


def flatten(
    conn: Connection,
    dom: libvirt.virDomain,
    disk: str,
    *,
    roots: Sequence[str],
    naming: qcow2.Naming = qcow2.CINDER,
    options: JobOptions | None = None,
) -> MergeResult:
    """Copy the whole chain into the active layer (expensive: only when asked for)."""
    opts = options or JobOptions()
    plan = plan_pull(resolve_disk(dom, disk), None, opts)
    return _run(conn, dom, plan, roots, naming, opts)
