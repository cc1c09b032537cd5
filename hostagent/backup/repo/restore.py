"""Restore a backup to a new raw or qcow2 file: sparse, every chunk verified, one fsync.

Two threads fetch, decode and verify chunks into recycled buffers
(:meth:`Repository.read_chunk_into`; zstd and hashlib release the GIL), one writes them
at their own offsets (writes to one file serialize on its inode lock anyway), so decoding
never waits for the disk. The file
gets its final size first (as qemu-img does). Zero blocks inside chunks are skipped (left
as holes). When durable, writeback is started as we go (``sync_file_range(WRITE)``) so the
single fsync at the end finds little left and disk I/O overlaps CPU work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from hostagent.backup.repo.files import FILE_MODE
from hostagent.backup.repo.format import (
    BackupCancelled,
    Cancel,
    Manifest,
    ManifestExtent,
    Progress,
)
from hostagent.backup.repo.repository import Repository
from hostagent.backup.repo.target import workspace
from qcow2 import convert_raw_fd_to_qcow2

_INFLIGHT = 6
_SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_SPARSE_BLOCK)
_SYNC_FILE_RANGE_WRITE = 2


@dataclass(frozen=True)
class RestoreResult:
    path: str
    fmt: str
    virtual_size: int
    bytes_written: int
    chunks: int


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None)
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _libc_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range now (advisory: failures are harmless)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        k = os.pwrite(fd, view, offset)
        view = view[k:]
        offset += k


def _write_sparse(fd: int, offset: int, data: memoryview, durable: bool) -> int:
    """pwrite only the non-zero 64 KiB blocks of ``data`` (zeros stay holes)."""
    written = 0
    n = len(data)
    run_start = -1
    for i in range(0, n + _SPARSE_BLOCK, _SPARSE_BLOCK):
        zero = i >= n or data[i : i + _SPARSE_BLOCK] == _ZERO_BLOCK[: min(_SPARSE_BLOCK, n - i)]
        if zero and run_start >= 0:
            stop = min(i, n)
            _pwrite_all(fd, data[run_start:stop], offset + run_start)
            if durable:
                _start_writeback(fd, offset + run_start, stop - run_start)
            written += stop - run_start
            run_start = -1
        elif not zero and run_start < 0:
            run_start = i
    return written


class _Buffers:
    """A fixed set of chunk-sized buffers, recycled: no allocation (and no page faults on
    fresh memory, measured at ~700k per 2 GiB restore) per chunk; also bounds memory."""

    def __init__(self, count: int, size: int) -> None:
        self._q: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._q.put(bytearray(size))

    def get(self) -> bytearray:
        return self._q.get()

    def put(self, buf: bytearray) -> None:
        self._q.put(buf)


def _write_group(
    fd: int, cid: str, chunk: memoryview, exts: list[ManifestExtent], durable: bool
) -> int:
    """Write the extents that use one (verified) chunk; pwrite is positional."""
    view = chunk
    written = 0
    for e in exts:
        if e.chunk_offset + e.length > len(view):
            raise ValueError(f"extent at {e.offset} exceeds chunk {cid}")
        part = view[e.chunk_offset : e.chunk_offset + e.length]
        written += _write_sparse(fd, e.offset, part, durable)
    return written


def _restore_raw(
    repo: Repository,
    m: Manifest,
    fd: int,
    progress: Progress | None,
    cancel: Cancel | None,
    durable: bool,
) -> tuple[int, int]:
    """Write every data extent; runs of extents sharing a chunk fetch it once.

    Two threads fetch + decompress + verify, one writes: a fetch thread never waits for
    the disk (writes block on dirty-page throttling and writeback).
    """
    groups: list[tuple[str, list[ManifestExtent]]] = []
    for e in m.extents:
        if e.kind != "data":
            continue
        assert e.chunk is not None
        if groups and groups[-1][0] == e.chunk:
            groups[-1][1].append(e)
        else:
            groups.append((e.chunk, [e]))
    total = sum(e.length for _, g in groups for e in g)
    done = written = 0
    # Final size first, as qemu-img does: writes inside i_size do not serialize on
    # extending the file (measured 6x slower pwrites when every write extended it).
    os.ftruncate(fd, m.virtual_size)
    bufs = _Buffers(2 * _INFLIGHT + 2, repo.config.chunk_size)
    fetching: deque[tuple[Future[int], bytearray, str, list[ManifestExtent]]] = deque()
    writing: deque[tuple[Future[int], int]] = deque()
    with (
        ThreadPoolExecutor(2, thread_name_prefix="qsnap-restore") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="qsnap-restore-io") as io,
    ):

        def write_and_recycle(cid: str, buf: bytearray, n: int, exts: list[ManifestExtent]) -> int:
            try:
                return _write_group(fd, cid, memoryview(buf)[:n], exts, durable)
            finally:
                bufs.put(buf)

        def to_writer() -> None:
            fut, buf, cid, exts = fetching.popleft()
            try:
                n = fut.result()
            except BaseException:
                bufs.put(buf)
                raise
            w = io.submit(write_and_recycle, cid, buf, n, exts)
            writing.append((w, sum(e.length for e in exts)))

        def written_one() -> None:
            nonlocal done, written
            w, n = writing.popleft()
            written += w.result()
            done += n
            if progress is not None:
                progress(done, total)

        try:
            for cid, exts in groups:
                if cancel is not None and cancel():
                    raise BackupCancelled("restore cancelled")
                while len(fetching) >= _INFLIGHT:
                    to_writer()
                while len(writing) >= _INFLIGHT:
                    written_one()
                buf = bufs.get()
                fetching.append((pool.submit(repo.read_chunk_into, cid, buf), buf, cid, exts))
            while fetching:
                to_writer()
            while writing:
                written_one()
        finally:
            for f, _b, _c, _e in fetching:
                f.cancel()
            for w, _n in writing:
                w.cancel()
    if durable:
        os.fsync(fd)
    return written, len({cid for cid, _ in groups})


def restore(
    repo: Repository,
    backup_id: str,
    dest_path: str | os.PathLike[str],
    *,
    fmt: str = "raw",
    volume_id: str | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    durable: bool = True,
    expect_dir: tuple[int, int] | None = None,
) -> RestoreResult:
    """Restore a backup to a NEW file (never overwritten), sparse, every chunk verified.

    Written in a private directory inside the target directory and linked into place from
    its open descriptor only when complete (:mod:`.target`), so a failed restore (e.g.
    :class:`CorruptChunk`) leaves no file at ``dest_path`` and no planted link or swapped
    name can redirect the writes. ``expect_dir`` is the target directory's ``(st_dev,
    st_ino)`` when the request was validated: a different directory there is refused
    (:class:`TargetChanged`). ``durable`` (default) fsyncs the file before it appears; False
    leaves it to the page cache like ``qemu-img convert`` does (for scratch copies).
    """
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"restore format {fmt!r} not supported")
    m = repo.load(volume_id, backup_id) if volume_id else repo.find(backup_id)
    dest = os.path.abspath(os.fspath(dest_path))
    with repo.reading(m), workspace(dest, expect_dir) as ws:  # GC and prune keep our chunks
        fd = ws.create("data.raw")
        try:
            written, chunks = _restore_raw(repo, m, fd, progress, cancel, durable)
            if fmt == "raw":
                ws.publish(fd, FILE_MODE)
            else:  # qemu-img reads our fd and creates its file in the private directory
                convert_raw_fd_to_qcow2(fd, ws.priv_fd, "data.qcow2")
                qfd = ws.open_made("data.qcow2")
                try:
                    if durable:
                        os.fsync(qfd)
                    ws.publish(qfd, FILE_MODE)
                finally:
                    os.close(qfd)
        finally:
            os.close(fd)
    return RestoreResult(dest, fmt, m.virtual_size, written, chunks)
