"""A backup repository on a POSIX directory (local, NFS or GlusterFS mount).

Layout (version 1)::

    config.json                       RepoConfig
    lock                              flock: backups hold it shared, GC exclusive
    chunks/ab/cd/<sha256>             zstd frame of the chunk's bytes; id = sha256(bytes)
    backups/<volume-id>/<backup-id>.json   Manifest (logically full)
    inprogress/<backup-id>.json       marker of a running backup (started_at, host, pid,
                                      parent_id: the manifest an incremental builds on)

Every file is written to a temporary name, fsynced, renamed, and its directory fsynced, so
a killed writer leaves at most unreferenced chunks and temp files, never a visible partial
backup: the manifest is published last, after every chunk it names is durable. Files are
0660 and directories 0770 (as Cinder's posix backup driver), whatever the umask.

Garbage collection rule (safe against a concurrent backup, also across hosts):

1. GC takes the ``lock`` file exclusively (non-blocking, retried up to ``wait`` seconds);
   a backup holds it shared from before its first chunk until its manifest is published.
   This alone suffices where flock works across clients (local, GlusterFS FUSE, NFSv4).
2. Where it may not (another host over NFSv3), every backup first publishes an
   ``inprogress`` marker and *touches* (mtime) every existing chunk it reuses. GC reads
   the markers BEFORE the manifests and deletes a chunk only if no manifest references it
   AND its mtime is older than both ``now - grace`` and the oldest live marker's start
   minus a clock-skew margin. A marker is dead when its pid is gone on this host, or older
   than ``stale_after``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import zstandard

from hostagent.backup.repo.codec import Buffer, raw_frame_into
from hostagent.backup.repo.files import DIR_MODE, FILE_MODE, atomic_write, mkdir_synced
from hostagent.backup.repo.format import (
    BackupNotFound,
    CorruptChunk,
    FormatError,
    Manifest,
    MissingChunk,
    RepoConfig,
    RepositoryBusy,
    check_chunk_id,
    check_uuid,
)
from hostagent.backup.repo.manifest_stream import ManifestHeader, read_header
from hostagent.backup.repo.manifest_stream import chunk_ids as stream_chunk_ids
from qcow2 import fsync_dir

CLOCK_SKEW = 300.0


_tls = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def _scratch(size: int) -> bytearray:
    """This thread's reusable read buffer, at least ``size`` bytes."""
    buf: bytearray | None = getattr(_tls, "raw", None)
    if buf is None or len(buf) < size:
        buf = _tls.raw = bytearray(size)
    return buf


def _decode(cid: str, path: str, frame: memoryview, out: bytearray) -> int:
    """Decode one chunk frame into ``out``; the byte count. Raw-block frames are copied
    block by block; compressed ones streamed by zstd into ``out`` (no temporary)."""
    n = raw_frame_into(frame, out)
    if n is not None:
        return n
    try:
        reader = _decompressor().stream_reader(frame)
        view = memoryview(out)
        n = 0
        while k := reader.readinto(view[n:]):
            n += k
        if n == len(out) and reader.read(1):
            raise CorruptChunk(cid, path, f"decodes to more than {len(out)} bytes")
    except zstandard.ZstdError as exc:
        raise CorruptChunk(cid, path, f"zstd: {exc}") from None
    return n


@dataclass(frozen=True)
class VerifyReport:
    backup_id: str
    chunks: int
    bytes: int


@dataclass(frozen=True)
class GcResult:
    removed: int
    bytes_freed: int
    kept_recent: int
    temp_removed: int
    #: stopped early by ``cancel``: the chunks not reached stay for the next GC.
    cancelled: bool = False


class Repository:
    """An opened repository. Thread-safe for chunk reads and writes."""

    def __init__(self, path: str, config: RepoConfig) -> None:
        self.path = os.path.abspath(path)
        self.config = config
        self._dirs: set[str] = set()  # chunk dirs known to exist: no mkdir for them
        self._dirty: set[str] = set()  # chunk dirs with renames not yet fsynced
        self._dirs_lock = threading.Lock()

    # --- creation ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], config: RepoConfig | None = None) -> Repository:
        """Create (or open, if it holds the same config) a repository at ``path``."""
        p = os.path.abspath(os.fspath(path))
        cfg = config or RepoConfig()
        if not os.path.isdir(p):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            mkdir_synced(p)
        os.chmod(p, DIR_MODE)
        cfg_path = os.path.join(p, "config.json")
        if os.path.exists(cfg_path):
            repo = cls.open(p)
            # The level only affects new chunks' size, never their ids: keep the existing one.
            if dataclasses.replace(repo.config, zstd_level=cfg.zstd_level) != cfg:
                raise FormatError(f"{p} already holds a repository with another config")
            return repo
        for sub in ("chunks", "backups", "inprogress"):
            mkdir_synced(os.path.join(p, sub))
        atomic_write(cfg_path, json.dumps(cfg.to_json(), indent=1).encode())
        return cls(p, cfg)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Repository:
        p = os.path.abspath(os.fspath(path))
        try:
            with open(os.path.join(p, "config.json"), "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            raise FormatError(f"{p} is not a qsnap repository (no config.json)") from None
        except ValueError as exc:
            raise FormatError(f"{p}/config.json: {exc}") from None
        return cls(p, RepoConfig.from_json(doc))

    # --- chunks -----------------------------------------------------------------------
    def chunk_path(self, chunk_id: str) -> str:
        c = check_chunk_id(chunk_id)
        return os.path.join(self.path, "chunks", c[0:2], c[2:4], c)

    def reuse_chunk(self, chunk_id: str) -> bool:
        """True if the chunk exists; its mtime is bumped so a concurrent GC spares it."""
        try:
            os.utime(self.chunk_path(chunk_id))
        except FileNotFoundError:
            return False
        return True

    def put_chunk(self, chunk_id: str, frame: Buffer | Sequence[Buffer]) -> None:
        """Store a chunk's zstd frame, whole or in pieces (durable once
        :meth:`sync_chunk_dirs` returns)."""
        path = self.chunk_path(chunk_id)
        d = os.path.dirname(path)
        if d not in self._dirs:
            mkdir_synced(os.path.dirname(d))
            mkdir_synced(d)
        atomic_write(path, frame, sync_dir=False)
        with self._dirs_lock:
            self._dirs.add(d)
            self._dirty.add(d)

    def sync_chunk_dirs(self) -> None:
        """fsync every chunk directory written since the last call (renames durable).

        Only those: a long-lived handle must not re-sync every directory it ever wrote."""
        with self._dirs_lock:
            dirty, self._dirty = self._dirty, set()
        try:
            for d in sorted(dirty):
                fsync_dir(d)
        except BaseException:
            with self._dirs_lock:
                self._dirty |= dirty  # not durable yet: the next call tries again
            raise

    def read_chunk(self, chunk_id: str) -> bytes:
        """The chunk's bytes, decompressed and verified against its id."""
        path = self.chunk_path(chunk_id)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise MissingChunk(chunk_id, path, "missing") from None
        try:
            data = _decompressor().decompress(raw)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(chunk_id, path, f"zstd: {exc}") from None
        if hashlib.sha256(data).hexdigest() != chunk_id:
            raise CorruptChunk(chunk_id, path, "sha256 mismatch")
        return data

    def read_chunk_into(self, chunk_id: str, out: bytearray) -> int:
        """Read, decode and verify a chunk into ``out`` (no per-chunk allocation); its
        length. Raises :class:`CorruptChunk`/:class:`MissingChunk` naming the chunk."""
        path = self.chunk_path(chunk_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingChunk(chunk_id, path, "missing") from None
        try:
            size = os.fstat(fd).st_size
            raw = memoryview(_scratch(size))[:size]
            got = 0
            while got < size:
                k = os.preadv(fd, [raw[got:]], got)
                if k == 0:
                    raise CorruptChunk(chunk_id, path, "truncated while reading")
                got += k
        finally:
            os.close(fd)
        n = _decode(chunk_id, path, raw, out)
        if hashlib.sha256(memoryview(out)[:n]).hexdigest() != chunk_id:
            raise CorruptChunk(chunk_id, path, "sha256 mismatch")
        return n

    # --- manifests --------------------------------------------------------------------
    def _manifest_path(self, volume_id: str, backup_id: str) -> str:
        v = check_uuid(volume_id, "volume id")
        b = check_uuid(backup_id, "backup id")
        return os.path.join(self.path, "backups", v, f"{b}.json")

    def publish(self, manifest: Manifest) -> None:
        """Make a backup visible: chunks durable first, then the manifest, atomically."""
        self.sync_chunk_dirs()
        path = self._manifest_path(manifest.volume_id, manifest.backup_id)
        mkdir_synced(os.path.dirname(path))
        atomic_write(path, manifest.dumps())

    def load(self, volume_id: str, backup_id: str) -> Manifest:
        try:
            with open(self._manifest_path(volume_id, backup_id), "rb") as f:
                return Manifest.loads(f.read())
        except FileNotFoundError:
            raise BackupNotFound(f"no backup {backup_id} of volume {volume_id}") from None

    def find(self, backup_id: str) -> Manifest:
        """A backup by id alone (what another site knows)."""
        check_uuid(backup_id, "backup id")
        for vol in self._volumes():
            path = os.path.join(self.path, "backups", vol, f"{backup_id}.json")
            if os.path.exists(path):
                return self.load(vol, backup_id)
        raise BackupNotFound(f"no backup {backup_id}")

    def _volumes(self) -> list[str]:
        root = os.path.join(self.path, "backups")
        return sorted(v for v in os.listdir(root) if not v.startswith("."))

    def _published(self, volume_id: str | None) -> Iterator[tuple[str, str]]:
        """(volume id, backup id) of every published manifest (of one volume)."""
        vols = [check_uuid(volume_id, "volume id")] if volume_id else self._volumes()
        for vol in vols:
            d = os.path.join(self.path, "backups", vol)
            if os.path.isdir(d):
                for name in os.listdir(d):
                    if name.endswith(".json") and not name.startswith("."):
                        yield vol, name[: -len(".json")]

    def manifests(self, volume_id: str | None = None) -> list[Manifest]:
        """Every published backup (of one volume), oldest first; all loaded at once (small
        repositories and tools only: :meth:`headers` and :meth:`chunk_ids_of` stream)."""
        out = [self.load(vol, bid) for vol, bid in self._published(volume_id)]
        return sorted(out, key=lambda m: (m.created_at, m.backup_id))

    def header(self, volume_id: str, backup_id: str) -> ManifestHeader:
        """A backup's manifest without its extents (a few KiB read, whatever the disk size)."""
        try:
            with open(self._manifest_path(volume_id, backup_id), "rb") as f:
                return read_header(f)
        except FileNotFoundError:
            raise BackupNotFound(f"no backup {backup_id} of volume {volume_id}") from None

    def headers(self, volume_id: str | None = None) -> list[ManifestHeader]:
        """Every published backup's header (of one volume), oldest first."""
        out = [self.header(vol, bid) for vol, bid in self._published(volume_id)]
        return sorted(out, key=lambda m: (m.created_at, m.backup_id))

    def chunk_ids_of(self, h: ManifestHeader) -> Iterator[str]:
        """The chunk ids a backup references, streamed from its manifest (repeats included)."""
        with open(self._manifest_path(h.volume_id, h.backup_id), "rb") as f:
            yield from stream_chunk_ids(f, h.virtual_size)

    def delete(self, volume_id: str, backup_id: str) -> None:
        """Unpublish a backup; its chunks go at the next :meth:`gc`."""
        path = self._manifest_path(volume_id, backup_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise BackupNotFound(f"no backup {backup_id} of volume {volume_id}") from None
        fsync_dir(os.path.dirname(path))

    def verify(self, backup: Manifest | str) -> VerifyReport:
        """Read and hash every chunk the backup references; raises :class:`CorruptChunk`."""
        m = self.find(backup) if isinstance(backup, str) else backup
        total = 0
        ids = sorted(m.chunk_ids())
        buf = bytearray(self.config.chunk_size)
        with self.reading(m):
            for cid in ids:
                total += self.read_chunk_into(cid, buf)
        return VerifyReport(m.backup_id, len(ids), total)

    # --- concurrency: backup sessions and GC ------------------------------------------
    def session(
        self, backup_id: str, volume_id: str, parent_id: str | None = None
    ) -> BackupSession:
        return BackupSession(self, backup_id, volume_id, parent_id)

    def reading(self, manifest: Manifest) -> BackupSession:
        """A restore or verify of ``manifest`` registers like a running backup: the shared
        lock makes GC wait, and a marker naming the backup as its parent keeps prune and
        delete off its manifest (so no chunk it reads can go while it reads)."""
        return BackupSession(self, str(uuid.uuid4()), manifest.volume_id, manifest.backup_id)

    def running(self, stale_after: float = 86400.0) -> list[dict[str, object]]:
        """In-progress markers of backups that may still be running (dead ones skipped)."""
        d = os.path.join(self.path, "inprogress")
        now, host, out = time.time(), socket.gethostname(), []
        for name in sorted(os.listdir(d)):
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(d, name), "rb") as f:
                    doc = json.loads(f.read())
                dead = now - float(doc["started_at"]) > stale_after or (
                    doc.get("host") == host and not _pid_alive(int(doc["pid"]))
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not dead and isinstance(doc, dict):
                out.append(doc)
        return out

    def _lock_fd(self) -> int:
        return os.open(
            os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
        )

    def _live_marker_start(self, stale_after: float) -> float | None:
        """Start time of the oldest live in-progress marker; dead ones are removed."""
        d = os.path.join(self.path, "inprogress")
        now = time.time()
        oldest: float | None = None
        host = socket.gethostname()
        for name in os.listdir(d):
            path = os.path.join(d, name)
            try:
                with open(path, "rb") as f:
                    doc = json.loads(f.read())
                started = float(doc["started_at"])
                dead = now - started > stale_after or (
                    doc.get("host") == host and not _pid_alive(int(doc["pid"]))
                )
            except (OSError, ValueError, KeyError, TypeError):
                st = os.stat(path)
                started, dead = st.st_mtime, now - st.st_mtime > stale_after
            if dead:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            oldest = started if oldest is None else min(oldest, started)
        return oldest

    def gc(
        self,
        *,
        grace: float = 3600.0,
        wait: float = 0.0,
        stale_after: float = 86400.0,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> GcResult:
        """Remove chunks no manifest references (see the module docstring for the rule).

        ``progress(scanned, total)`` follows the chunk files; ``cancel`` is checked before
        each one, so a cancelled GC stops between chunks (each is deleted or not)."""
        fd = self._lock_fd()
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RepositoryBusy("a backup holds the repository lock") from None
                    time.sleep(0.1)
            return self._gc_locked(grace, stale_after, progress, cancel)
        finally:
            os.close(fd)

    def _gc_locked(
        self,
        grace: float,
        stale_after: float,
        progress: Callable[[int, int], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> GcResult:
        start = time.time()
        marker = self._live_marker_start(stale_after)  # markers BEFORE manifests
        cutoff = start - grace
        if marker is not None:
            cutoff = min(cutoff, marker - CLOCK_SKEW)
        referenced: set[str] = set()
        for h in self.headers():  # one manifest at a time: memory bounded by the chunk set
            referenced.update(self.chunk_ids_of(h))
        removed = freed = kept = temps = 0
        files = list(self._chunk_files())
        for n, (path, name) in enumerate(files):
            if cancel is not None and cancel():
                return GcResult(removed, freed, kept, temps, cancelled=True)
            if progress is not None and n % 256 == 0:
                progress(n, len(files))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if name.startswith("."):
                if st.st_mtime < cutoff:
                    os.unlink(path)
                    temps += 1
                continue
            if name in referenced:
                continue
            if st.st_mtime >= cutoff:
                kept += 1
                continue
            os.unlink(path)
            removed += 1
            freed += st.st_size
        if progress is not None:
            progress(len(files), len(files))
        return GcResult(removed, freed, kept, temps)

    def _chunk_files(self) -> Iterator[tuple[str, str]]:
        root = os.path.join(self.path, "chunks")
        for a in os.listdir(root):
            for b in os.listdir(os.path.join(root, a)):
                d = os.path.join(root, a, b)
                for name in os.listdir(d):
                    yield os.path.join(d, name), name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BackupSession:
    """One running backup: shared repository lock + in-progress marker until publish/abort."""

    def __init__(
        self, repo: Repository, backup_id: str, volume_id: str, parent_id: str | None = None
    ) -> None:
        self.repo = repo
        self.backup_id = check_uuid(backup_id, "backup id")
        self.volume_id = check_uuid(volume_id, "volume id")
        self.parent_id = None if parent_id is None else check_uuid(parent_id, "parent id")
        self._marker = os.path.join(repo.path, "inprogress", f"{backup_id}.json")
        self._fd: int | None = None

    def __enter__(self) -> BackupSession:
        fd = self.repo._lock_fd()
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd
        doc = {
            "backup_id": self.backup_id,
            "volume_id": self.volume_id,
            "parent_id": self.parent_id,  # prune never deletes it while this runs
            "started_at": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        try:
            atomic_write(self._marker, json.dumps(doc).encode())
        except BaseException:
            self._release()
            raise
        return self

    def publish(self, manifest: Manifest) -> None:
        if manifest.backup_id != self.backup_id:
            raise ValueError("manifest of another backup")
        self.repo.publish(manifest)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
