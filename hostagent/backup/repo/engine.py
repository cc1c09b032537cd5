"""Backup and restore of a FROZEN layer's guest view, through qcow2/'s inspected reader.

The caller (online orchestration) freezes the layer first; this module only reads it. Reads
happen on the calling thread with large preads (one per chunk, up to ``chunk_size``) and only
over DATA extents; hashing, compression and chunk writes run on a 2-thread pool so they overlap
the reads (hashlib, zstd and file I/O release the GIL). Chunks are cut on a fixed virtual grid
so unchanged data hashes the same in every backup and is stored once.

An incremental backup reads only the ranges allocated in the layers above the boundary (the
checkpoint left by the parent backup) and takes everything else by reference from the parent
manifest, so each manifest stays logically full.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import queue
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zstandard

from hostagent.backup.repo.codec import Buffer, raw_frame, worth_compressing
from hostagent.backup.repo.format import (
    BackupCancelled,
    Cancel,
    Checkpoint,
    Manifest,
    ManifestExtent,
    Progress,
    SourceLayer,
)
from hostagent.backup.repo.repository import Repository
from qcow2 import CINDER, Chain, ExtentKind, Naming, open_chain

_INFLIGHT = 6
_IO_INFLIGHT = 12  # compressed/raw frames waiting for write + fsync (<= 48 MiB)
_SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_SPARSE_BLOCK)


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    bytes_read: int
    chunks_new: int
    chunks_reused: int
    bytes_stored: int
    seconds: float
    fallback_reason: str | None = None


class RateLimit:
    """A token bucket of ``rate`` bytes/s for one volume's read stream (``[backup]
    bandwidth_mib``), so a backup does not saturate the share it reads from.

    :meth:`take` is called on the READING thread after each chunk (the engine's progress
    callback runs there), so sleeping in it slows the reads themselves. It sleeps in slices
    of at most 0.1 s and returns early once ``cancel`` says so, keeping a cancel prompt. The
    bucket holds at most one second of credit: an idle moment does not buy a later burst.
    """

    SLICE = 0.1

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate, self._clock, self._sleep = float(rate), clock, sleep
        self._credit = 0.0
        self._last = clock()

    def take(self, nbytes: int, cancel: Cancel | None = None) -> None:
        """Spend ``nbytes``; sleep until the bucket is no longer in debt (or cancelled)."""
        self._refill()
        self._credit -= nbytes
        while self._credit < 0:
            if cancel is not None and cancel():
                return
            self._sleep(min(self.SLICE, -self._credit / self._rate))
            self._refill()

    def _refill(self) -> None:
        now = self._clock()
        self._credit = min(self._rate, self._credit + (now - self._last) * self._rate)
        self._last = now


class _Buffers:
    """Recycled chunk-sized buffers: no allocation (and no fresh-page faults) per chunk."""

    def __init__(self, count: int, size: int) -> None:
        self._q: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._q.put(bytearray(size))

    def get(self) -> bytearray:
        return self._q.get()

    def put(self, buf: bytearray) -> None:
        self._q.put(buf)


class _ChunkWriter:
    """Hash + compress + store chunks on a small pool, at most ``_INFLIGHT`` queued."""

    def __init__(self, repo: Repository, threads: int = 2, io_threads: int = 4) -> None:
        self._repo = repo
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="qsnap-chunk")
        # write + fsync + rename on their own threads: a compute thread blocked in fsync
        # would leave a core idle (measured: half the workers' time on a busy disk).
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="qsnap-chunk-io")
        self._slots = threading.BoundedSemaphore(_INFLIGHT)
        self._io_slots = threading.BoundedSemaphore(_IO_INFLIGHT)
        # one per queued/running compute task and pending write, plus the reader's
        self._bufs = _Buffers(_INFLIGHT + threads + _IO_INFLIGHT + 2, repo.config.chunk_size)
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.new = self.reused = self.stored = 0

    def buffer(self) -> bytearray:
        """A chunk-sized read buffer; blocks while all are in flight (bounds memory)."""
        return self._bufs.get()

    def recycle(self, buf: bytearray) -> None:
        self._bufs.put(buf)

    def submit(self, data: memoryview, buf: bytearray) -> Future[str]:
        """Store ``data`` (a view of ``buf``); ``buf`` is recycled once nothing uses it."""
        try:
            self.check()
        except BaseException:
            self.recycle(buf)
            raise
        self._slots.acquire()
        fut = self._pool.submit(self._store, data, buf)
        fut.add_done_callback(self._done)
        return fut

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _failed(self, fut: Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()

    def _done(self, fut: Future[str]) -> None:
        self._slots.release()
        self._failed(fut)

    def _io_done(self, fut: Future[None]) -> None:
        self._io_slots.release()
        self._failed(fut)

    def _store(self, data: memoryview, buf: bytearray) -> str:
        owned = True  # False once a raw frame's views of buf belong to the pending write
        try:
            cid = hashlib.sha256(data).hexdigest()
            if self._repo.reuse_chunk(cid):
                with self._lock:
                    self.reused += 1
                return cid
            cctx: zstandard.ZstdCompressor | None = getattr(self._tls, "cctx", None)
            if cctx is None:
                level = self._repo.config.zstd_level
                cctx = self._tls.cctx = zstandard.ZstdCompressor(level=level)
                self._tls.probe = zstandard.ZstdCompressor(level=1)
            raw = not worth_compressing(data, self._tls.probe)
            frame: list[Buffer] = raw_frame(data) if raw else [cctx.compress(data)]
            self._io_slots.acquire()
            owned = not raw
            try:
                io = self._io.submit(self._repo.put_chunk, cid, frame)
            except BaseException:
                owned = True
                self._io_slots.release()
                raise
            if raw:

                def written(f: Future[None]) -> None:
                    self.recycle(buf)
                    self._io_done(f)

                io.add_done_callback(written)
            else:
                io.add_done_callback(self._io_done)
            with self._lock:
                self.new += 1
                self.stored += sum(len(p) for p in frame)
            return cid
        finally:
            if owned:
                self.recycle(buf)

    def close(self, cancel: bool) -> None:
        """Wait for every chunk to be durable under its name (or drop queued work)."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._io.shutdown(wait=True, cancel_futures=cancel)


# (offset, length, chunk id future / None for zero, chunk offset) | parent extent as-is
_Planned = tuple[int, int, "Future[str] | None", int] | ManifestExtent


def _merged_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            start, m = out[-1]
            out[-1] = (start, max(m, off + n - start))
        else:
            out.append((off, n))
    return out


class _Run:
    """State of one backup run: reads the chain, feeds the writer, plans the manifest."""

    def __init__(
        self, chain: Chain, repo: Repository, progress: Progress | None, cancel: Cancel | None
    ) -> None:
        self.chain = chain
        self.cs = repo.config.chunk_size
        self.writer = _ChunkWriter(repo)
        self.progress = progress
        self.cancel = cancel
        self.plan: list[_Planned] = []
        self.read = 0
        self.total = 0

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) over the guest view, adjacent DATA extents coalesced."""
        out: list[tuple[int, int, bool]] = []
        for e in self.chain.extents(offset, length):
            data = e.kind is ExtentKind.DATA
            if out and out[-1][2] == data:
                o, n, _ = out[-1]
                out[-1] = (o, n + e.length, data)
            else:
                out.append((e.offset, e.length, data))
        return out

    def read_ranges(self, ranges: Sequence[tuple[int, int, bool]]) -> None:
        for off, n, data in ranges:
            if not data:
                self.plan.append((off, n, None, 0))
                continue
            pos, end = off, off + n
            while pos < end:
                if self.cancel is not None and self.cancel():
                    raise BackupCancelled("backup cancelled")
                stop = min(end, (pos // self.cs + 1) * self.cs)
                n = stop - pos
                buf = self.writer.buffer()
                try:
                    view = memoryview(buf)[:n]
                    got = self.chain.readinto(pos, view)
                    if got != n:
                        raise OSError(f"short read at {pos}: {got} of {n}")
                except BaseException:
                    self.writer.recycle(buf)
                    raise
                self.plan.append((pos, n, self.writer.submit(view, buf), 0))
                self.read += n
                if self.progress is not None:
                    self.progress(self.read, self.total)
                pos = stop

    def extents(self, size: int) -> tuple[ManifestExtent, ...]:
        """Resolve chunk futures; fill gaps with zero and merge adjacent zero ranges."""
        out: list[ManifestExtent] = []
        pos = 0

        def zero(off: int, n: int) -> None:
            if n <= 0:
                return
            if out and out[-1].kind == "zero" and out[-1].offset + out[-1].length == off:
                out[-1] = ManifestExtent(out[-1].offset, out[-1].length + n, "zero")
            else:
                out.append(ManifestExtent(off, n, "zero"))

        for item in self.plan:
            if isinstance(item, ManifestExtent):
                e = item
            else:
                off, n, fut, coff = item
                if fut is None:
                    e = ManifestExtent(off, n, "zero")
                else:
                    e = ManifestExtent(off, n, "data", fut.result(), coff)
            zero(pos, e.offset - pos)
            if e.kind == "zero":
                zero(e.offset, e.length)
            else:
                out.append(e)
            pos = e.offset + e.length
        zero(pos, size - pos)
        return tuple(out)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _source(chain: Chain) -> tuple[SourceLayer, ...]:
    return tuple(SourceLayer(os.path.basename(li.path), li.fmt) for li in chain.layers)


def _execute(
    chain: Chain,
    repo: Repository,
    volume_id: str,
    work: Callable[[_Run], None],
    *,
    parent_id: str | None,
    kind: str,
    fallback_reason: str | None,
    progress: Progress | None,
    cancel: Cancel | None,
    total: int,
    checkpoint: Checkpoint | None = None,
) -> BackupResult:
    t0 = time.monotonic()
    backup_id = str(uuid.uuid4())
    with repo.session(
        backup_id, volume_id, parent_id if kind == "incremental" else None
    ) as session:
        if parent_id is not None and kind == "incremental":
            repo.load(volume_id, parent_id)  # still there now that our marker pins it
        run = _Run(chain, repo, progress, cancel)
        run.total = total
        ok = False
        try:
            work(run)
            extents = run.extents(chain.virtual_size)
            run.writer.close(cancel=False)
            run.writer.check()
            ok = True
        finally:
            if not ok:
                run.writer.close(cancel=True)
        manifest = Manifest(
            backup_id=backup_id,
            volume_id=volume_id,
            virtual_size=chain.virtual_size,
            created_at=_now(),
            parent_id=parent_id,
            kind="incremental" if kind == "incremental" else "full",
            source_chain=_source(chain),
            read_bytes=run.read,
            extents=extents,
            fallback_reason=fallback_reason,
            checkpoint=checkpoint,
        )
        session.publish(manifest)
    w = run.writer
    return BackupResult(
        manifest, run.read, w.new, w.reused, w.stored, time.monotonic() - t0, fallback_reason
    )


def backup_full(
    layer_path: str | os.PathLike[str],
    fmt: str,
    roots: Sequence[str | os.PathLike[str]],
    repo: Repository,
    volume_id: str,
    *,
    naming: Naming = CINDER,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    parent: Manifest | None = None,
    fallback_reason: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> BackupResult:
    """Back up the whole guest view of the (frozen) chain under ``layer_path``.

    Existing chunks are deduplicated, so a full backup after a previous one stores only
    what changed, but it still reads every DATA extent.
    """
    with open_chain(layer_path, roots=roots, naming=naming, fmt=fmt) as chain:
        ranges = _Run(chain, repo, None, None).data_ranges(0, chain.virtual_size)
        return _execute(
            chain,
            repo,
            volume_id,
            lambda run: run.read_ranges(ranges),
            parent_id=parent.backup_id if parent else None,
            kind="full",
            fallback_reason=fallback_reason,
            progress=progress,
            cancel=cancel,
            total=sum(n for _, n, d in ranges if d),
            checkpoint=checkpoint,
        )


def _boundary_depth(
    chain: Chain, boundary: int | str, parent: Manifest, expect: str | None
) -> int | str:
    """Depth of the boundary layer, or the reason an incremental is impossible."""
    names = [os.path.basename(li.path) for li in chain.layers]
    if isinstance(boundary, str):
        if boundary not in names:
            return f"boundary {boundary} is no longer in the chain"
        depth = names.index(boundary)
    else:
        if not 0 <= boundary < len(names):
            return f"boundary depth {boundary} outside a chain of {len(names)} layers"
        depth = boundary
    read_top = expect
    if read_top is None:
        read_top = parent.source_chain[0].name if parent.source_chain else None
    if names[depth] != read_top:
        return (
            f"boundary {names[depth]} is not the layer parent {parent.backup_id} read ({read_top})"
        )
    return depth


def _parent_slice(parent: Manifest, starts: list[int], a: int, b: int) -> Iterator[ManifestExtent]:
    """The parent's extents clipped to [a, b)."""
    ext = parent.extents
    i = max(0, bisect_right(starts, a) - 1)
    while i < len(ext) and ext[i].offset < b:
        e = ext[i]
        lo, hi = max(a, e.offset), min(b, e.offset + e.length)
        if lo < hi:
            coff = e.chunk_offset + (lo - e.offset) if e.kind == "data" else 0
            yield ManifestExtent(lo, hi - lo, e.kind, e.chunk, coff)
        i += 1


def backup_incremental(
    layer_path: str | os.PathLike[str],
    fmt: str,
    roots: Sequence[str | os.PathLike[str]],
    repo: Repository,
    volume_id: str,
    parent: Manifest,
    boundary: int | str,
    *,
    naming: Naming = CINDER,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    parent_boundary: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> BackupResult:
    """Read only what is allocated above ``boundary`` (a depth, or the boundary file's name).

    ``boundary`` must be the layer whose guest view equals the parent backup's, still in the
    chain and unchanged since: by default the layer the parent read (its
    ``source_chain[0]``), or ``parent_boundary`` when the parent's read layer was merged
    into it since (the online checkpoint). If it is not, this falls back to a full read
    with deduplication and says why in ``fallback_reason``.
    """
    if parent.volume_id != volume_id:
        raise ValueError(f"parent {parent.backup_id} belongs to volume {parent.volume_id}")
    with open_chain(layer_path, roots=roots, naming=naming, fmt=fmt) as chain:
        depth = _boundary_depth(chain, boundary, parent, parent_boundary)
        if isinstance(depth, str):
            chain.close()
            return backup_full(
                layer_path,
                fmt,
                roots,
                repo,
                volume_id,
                naming=naming,
                progress=progress,
                cancel=cancel,
                parent=parent,
                fallback_reason=depth,
                checkpoint=checkpoint,
            )
        size = chain.virtual_size
        changed_raw: list[tuple[int, int]] = []
        for d in range(depth):
            for e in chain.layer_extents(d):
                if e.kind is not ExtentKind.UNALLOCATED and e.offset < size:
                    changed_raw.append((e.offset, min(e.length, size - e.offset)))
        if size > parent.virtual_size:
            changed_raw.append((parent.virtual_size, size - parent.virtual_size))
        changed = _merged_ranges(changed_raw)
        probe = _Run(chain, repo, None, None)
        plan: list[tuple[int, int, list[tuple[int, int, bool]] | None]] = []
        pos = 0
        for off, n in changed:
            if off > pos:
                plan.append((pos, off - pos, None))
            plan.append((off, n, probe.data_ranges(off, n)))
            pos = off + n
        if pos < size:
            plan.append((pos, size - pos, None))
        starts = [e.offset for e in parent.extents]

        def work(run: _Run) -> None:
            for off, n, ranges in plan:
                if ranges is None:
                    run.plan.extend(_parent_slice(parent, starts, off, off + n))
                else:
                    run.read_ranges(ranges)

        return _execute(
            chain,
            repo,
            volume_id,
            work,
            parent_id=parent.backup_id,
            kind="incremental",
            fallback_reason=None,
            progress=progress,
            cancel=cancel,
            total=sum(n for _, _, r in plan if r for _, n, d in r if d),
            checkpoint=checkpoint,
        )
