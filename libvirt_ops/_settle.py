"""Settle a block job a dead process left on a disk: let it end, pivot an active commit.

libvirt keeps a block job when the client that started it dies, and an ACTIVE COMMIT never
ends on its own: after READY it mirrors forever until somebody pivots or aborts it. Until
then every new job on that disk is refused ("already has a block job") and the merged-away
overlay stays the live top. A restarted agent has no :class:`BlockJob` of its own for it, so
:func:`settle_block_job` adopts the job (same event/re-check machinery, same per-disk claim),
finishes what the dead process meant (commit/pull: wait for the end; active commit: wait for
READY, then pivot, as every active commit here is started to be pivoted) and reports what
it found. The caller judges the resulting chain (the job's base is not in ``blockJobInfo``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import libvirt
from lxml import etree

import qcow2
from libvirt_ops._blockjob import BlockJob, JobEnd, JobOptions, JobType
from libvirt_ops._connection import Connection
from libvirt_ops._merge import _inspect, _paths, resolve_disk
from libvirt_ops.errors import BlockJobFailed, Timeout

#: How often libvirt's own READY flag (the XML's ``<mirror ready='yes'>``) is re-read.
_READY_POLL = 0.05


@dataclass(frozen=True)
class SettleResult:
    """What :func:`settle_block_job` found on the disk and what it did."""

    disk: str
    #: The job found (None: the disk had no job, nothing was done).
    found: JobType | None
    #: How the job ended (None: no job). COMPLETED after a pivot or a normal end.
    end: JobEnd | None
    #: An active commit was pivoted onto its base (the interrupted merge's intent).
    pivoted: bool
    chain_before: tuple[str, ...]
    chain_after: tuple[str, ...]
    seconds: float


def _mirror_ready(dom: libvirt.virDomain, target: str) -> bool:
    """libvirt's own READY state; a pivot is refused until it is set (the QEMU event may
    still be in flight while ``blockJobInfo`` already shows cur == end)."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    for disk in root.iterfind("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


def _await_mirror_ready(job: BlockJob, deadline: float) -> None:
    while not _mirror_ready(job.domain(), job.target):
        if time.monotonic() >= deadline:
            raise Timeout(f"{job!r}: libvirt never marked the mirror ready")
        time.sleep(_READY_POLL)


def settle_block_job(
    conn: Connection,
    dom: libvirt.virDomain,
    disk: str,
    *,
    timeout: float,
    roots: Sequence[str],
    naming: qcow2.Naming = qcow2.CINDER,
) -> SettleResult:
    """Bring the job on ``disk`` (a target or volume id) to its end within ``timeout`` s.

    No job: nothing is done. COMMIT/PULL: awaited. ACTIVE_COMMIT: awaited to READY, pivoted,
    awaited. A COPY job is none of ours and is refused (:class:`BlockJobFailed`). A job that
    fails or is cancelled is reported in ``end`` (the chain is then unchanged). Afterwards the
    disk must have no job and the live chain must equal the files' headers (inspected from
    the top under ``roots``), else :class:`BlockJobFailed`. On the deadline the job is
    aborted (an abort leaves the chain as it was) and :class:`Timeout` is raised.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    d = resolve_disk(dom, disk)
    before = _paths(d.chain)
    info = dom.blockJobInfo(d.target, 0)
    if not info:
        return SettleResult(d.target, None, None, False, before, before, time.monotonic() - t0)
    try:
        job_type = JobType(int(info["type"]))
    except ValueError as exc:
        raise BlockJobFailed(f"{dom.name()}:{d.target}: unknown block job {info}") from exc
    if job_type is JobType.COPY:
        raise BlockJobFailed(f"{dom.name()}:{d.target} has a block copy: not ours to settle")
    pivoted = False
    opts = JobOptions(timeout=timeout)
    with BlockJob(conn, dom, d.target, job_type, opts, adopt=True) as job:
        if job_type is JobType.ACTIVE_COMMIT:
            end = job.wait(frozenset({JobEnd.READY}))
            if end is JobEnd.READY:
                _await_mirror_ready(job, deadline)
                job.pivot()
                pivoted = True
                left = max(0.1, deadline - time.monotonic())
                job.options = JobOptions(timeout=left)
                end = job.wait(frozenset({JobEnd.COMPLETED}))
        else:
            end = job.wait(frozenset({JobEnd.COMPLETED}))
        if job.info():
            raise BlockJobFailed(f"{job!r} ended {end.name} but a job is still on the disk")
        now = resolve_disk(job.domain(), d.target)
    after = _paths(now.chain)
    try:
        on_disk = _inspect(now, roots, naming)
    except qcow2.Qcow2Error as exc:
        raise BlockJobFailed(f"{d.target}: unsafe chain after settling: {exc}") from exc
    if on_disk != after:
        raise BlockJobFailed(
            f"{d.target}: live chain {after} differs from the files' headers {on_disk}"
        )
    return SettleResult(d.target, job_type, end, pivoted, before, after, time.monotonic() - t0)
