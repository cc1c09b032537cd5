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

import contextlib
import ctypes
import ctypes.util
import os
import queue
import secrets
import subprocess
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from hostagent.backup.repo.format import (
    BackupCancelled,
    Manifest,
    ManifestExtent,
)
from hostagent.backup.repo.repository import FILE_MODE, Repository
from qcow2 import QemuImgError

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]
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
) -> RestoreResult:
    """Restore a backup to a NEW file (never overwritten), sparse, every chunk verified.

    Written under a temporary name and linked into place only when complete, so a failed
    restore (e.g. :class:`CorruptChunk`) leaves no file at ``dest_path``. ``durable``
    (default) fsyncs the file before it appears; False leaves it to the page cache like
    ``qemu-img convert`` does (for scratch copies).
    """
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"restore format {fmt!r} not supported")
    m = repo.load(volume_id, backup_id) if volume_id else repo.find(backup_id)
    dest = os.path.abspath(os.fspath(dest_path))
    if os.path.lexists(dest):
        raise FileExistsError(dest)
    d, name = os.path.split(dest)
    tmp = os.path.join(d, f"{_partial_prefix(name)}{secrets.token_hex(4)}")
    tmp_q = tmp + ".qcow2"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            written, chunks = _restore_raw(repo, m, fd, progress, cancel, durable)
        finally:
            os.close(fd)
        final = tmp
        if fmt == "qcow2":
            argv = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", tmp, tmp_q]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise QemuImgError(argv, proc.returncode, proc.stderr)
            if durable:
                qfd = os.open(tmp_q, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(qfd)
                finally:
                    os.close(qfd)
            final = tmp_q
        os.link(final, dest)  # fails rather than overwrite a file created meanwhile
    finally:
        for p in (tmp, tmp_q):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return RestoreResult(dest, fmt, m.virtual_size, written, chunks)


def _partial_prefix(name: str) -> str:
    """Restores write ``.<name>.restore-<random>[.qcow2]`` beside the target, then link it."""
    return f".{name}.restore-"


def remove_partial(dest_path: str) -> list[str]:
    """Remove what a restore to ``dest_path`` killed mid-write left beside it; their names.

    The target itself never appears half written (it is linked only when complete), so
    after a restart only the temporary files are left to clean up.
    """
    d, name = os.path.split(dest_path)
    removed: list[str] = []
    if name and os.path.isdir(d):
        for tmp in os.listdir(d):
            if tmp.startswith(_partial_prefix(name)):
                os.unlink(os.path.join(d, tmp))
                removed.append(tmp)
    return removed
