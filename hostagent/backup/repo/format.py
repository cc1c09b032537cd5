"""The versioned on-disk vocabulary of a backup repository, and its errors.

Everything another site needs to restore lives in two kinds of file: the repository
``config.json`` and one manifest per backup. Both are parsed strictly here (ids end up in
paths, so a forged manifest must not be able to name ``../x``). A manifest is logically
full: its extent list covers the whole disk, data ranges pointing into content-addressed
chunks, so a restore never replays a chain of backups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hostagent.errors import QsnapAgentError
from qcow2.naming import is_uuid

MiB = 1 << 20

#: ``(done, total)`` bytes of a backup/restore stream (called on its reading thread).
Progress = Callable[[int, int], None]
#: True once the operation was asked to stop (checked between chunks).
Cancel = Callable[[], bool]
REPO_FORMAT = "qsnap-repo"
MANIFEST_FORMAT = "qsnap-manifest"
VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BackupError(QsnapAgentError):
    """Base of every error of :mod:`hostagent.backup`."""


class FormatError(BackupError):
    """A config or manifest file is not one this version understands."""


class CorruptChunk(BackupError):
    """A chunk's content does not hash to its id (or does not decompress)."""

    def __init__(self, chunk_id: str, path: str, detail: str) -> None:
        self.chunk_id = chunk_id
        self.path = path
        self.detail = detail
        super().__init__(f"chunk {chunk_id} at {path} is corrupt: {detail}")


class MissingChunk(CorruptChunk):
    """A manifest references a chunk that is not in the repository."""


class RepositoryFull(BackupError):
    """The repository's filesystem ran out of space (ENOSPC/EDQUOT); no manifest was written."""


class RepositoryBusy(BackupError):
    """Garbage collection could not get the repository lock (a backup is running)."""


class BackupNotFound(BackupError):
    """No manifest with that backup id (for that volume)."""


class BackupCancelled(BackupError):
    """The caller's cancel callback asked to stop; nothing was published."""


def check_chunk_id(value: str) -> str:
    if not _HEX64.fullmatch(value):
        raise FormatError(f"bad chunk id {value!r}")
    return value


def check_uuid(value: str, what: str) -> str:
    if not isinstance(value, str) or not is_uuid(value):
        raise FormatError(f"bad {what} {value!r}: must be a lower-case UUID")
    return value


@dataclass(frozen=True)
class RepoConfig:
    """``config.json``: fixed for the life of a repository (chunks depend on it)."""

    chunk_size: int = 4 * MiB
    hash: str = "sha256"
    compression: str = "zstd"
    # Level 1: backups are CPU-bound on small hosts; on real text it costs ~8 % more bytes
    # than level 3 for ~40 % less CPU (bench/backup_full.py). Decoding ignores the level.
    zstd_level: int = 1
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPO_FORMAT,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "compression": self.compression,
            "zstd_level": self.zstd_level,
        }

    @classmethod
    def from_json(cls, doc: Any) -> RepoConfig:
        if not isinstance(doc, dict) or doc.get("format") != REPO_FORMAT:
            raise FormatError("not a qsnap repository config")
        if doc.get("version") != VERSION:
            raise FormatError(f"repository version {doc.get('version')!r} not supported")
        if doc.get("hash") != "sha256" or doc.get("compression") != "zstd":
            raise FormatError("only sha256 chunks with zstd compression are supported")
        cs = doc.get("chunk_size")
        if not isinstance(cs, int) or not (64 * 1024 <= cs <= 64 * MiB) or cs & (cs - 1):
            raise FormatError(f"bad chunk_size {cs!r}")
        level = doc.get("zstd_level", 3)
        if not isinstance(level, int):
            raise FormatError(f"bad zstd_level {level!r}")
        return cls(chunk_size=cs, zstd_level=level)


ExtentKindName = Literal["data", "zero"]


@dataclass(frozen=True)
class ManifestExtent:
    """``length`` guest bytes at ``offset``: zeros, or ``chunk[chunk_offset:+length]``."""

    offset: int
    length: int
    kind: ExtentKindName
    chunk: str | None = None
    chunk_offset: int = 0

    def to_json(self) -> list[Any]:
        if self.kind == "zero":
            return [self.offset, self.length, "zero"]
        return [self.offset, self.length, "data", self.chunk, self.chunk_offset]

    @classmethod
    def from_json(cls, item: Any) -> ManifestExtent:
        if not isinstance(item, list) or len(item) not in (3, 5):
            raise FormatError(f"bad extent {item!r}")
        off, length, kind = item[0], item[1], item[2]
        if not all(isinstance(v, int) and v >= 0 for v in (off, length)) or length == 0:
            raise FormatError(f"bad extent range {item!r}")
        if kind == "zero" and len(item) == 3:
            return cls(off, length, "zero")
        if kind == "data" and len(item) == 5:
            cid, coff = item[3], item[4]
            if not isinstance(cid, str) or not isinstance(coff, int) or coff < 0:
                raise FormatError(f"bad data extent {item!r}")
            return cls(off, length, "data", check_chunk_id(cid), coff)
        raise FormatError(f"bad extent kind {item!r}")


@dataclass(frozen=True)
class SourceLayer:
    """One file of the chain the backup was read from (top first)."""

    name: str
    fmt: str


def check_basename(value: Any, what: str) -> str:
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\0" in value:
        raise FormatError(f"bad {what} {value!r}: must be a plain file name")
    return value


@dataclass(frozen=True)
class Checkpoint:
    """Where the next incremental may start: the Cinder snapshot ``snapshot_id`` the backup
    read at, recorded in the volume's ledger as ``overlay`` (``volume-<vid>.<snapshot id>``)
    over ``boundary``, whose guest view equals this backup's. ``snapshot_id`` None: a
    checkpoint overlay of an earlier qsnap, never trusted again (the next backup is full).
    """

    overlay: str
    boundary: str
    snapshot_id: str | None = None

    def to_json(self) -> dict[str, str]:
        doc = {"overlay": self.overlay, "boundary": self.boundary}
        if self.snapshot_id is not None:
            doc["snapshot_id"] = self.snapshot_id
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Checkpoint | None:
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise FormatError(f"bad checkpoint {doc!r}")
        sid = doc.get("snapshot_id")
        if sid is not None and not (isinstance(sid, str) and is_uuid(sid)):
            raise FormatError(f"bad checkpoint snapshot id {sid!r}")
        return cls(
            check_basename(doc.get("overlay"), "checkpoint overlay"),
            check_basename(doc.get("boundary"), "checkpoint boundary"),
            sid,
        )


@dataclass(frozen=True)
class Manifest:
    """One backup. Holds Cinder-style metadata (volume id, size, created_at, parent)."""

    backup_id: str
    volume_id: str
    virtual_size: int
    created_at: str
    parent_id: str | None
    kind: Literal["full", "incremental"]
    source_chain: tuple[SourceLayer, ...]
    read_bytes: int
    extents: tuple[ManifestExtent, ...]
    fallback_reason: str | None = None
    #: Optional (absent in manifests of offline backups): see :class:`Checkpoint`.
    checkpoint: Checkpoint | None = None
    version: int = field(default=VERSION)

    def chunk_ids(self) -> set[str]:
        return {e.chunk for e in self.extents if e.chunk is not None}

    def data_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.kind == "data")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "backup_id": self.backup_id,
            "volume_id": self.volume_id,
            "virtual_size": self.virtual_size,
            "created_at": self.created_at,
            "parent_id": self.parent_id,
            "kind": self.kind,
            "source_chain": [{"name": s.name, "format": s.fmt} for s in self.source_chain],
            "read_bytes": self.read_bytes,
            "fallback_reason": self.fallback_reason,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.to_json(),
            # header figures for listings that never read the extents (optional on read)
            "data_bytes": self.data_bytes(),
            "chunks": len(self.chunk_ids()),
            # LAST, always: hostagent.backup.repo.manifest_stream reads up to this key
            "extents": [e.to_json() for e in self.extents],
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise FormatError(f"manifest is not JSON: {exc}") from None
        return cls.from_doc(doc)

    @classmethod
    def from_doc(cls, doc: Any) -> Manifest:
        """A parsed manifest document, validated (ids end up in paths)."""
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise FormatError("not a qsnap manifest")
        if doc.get("version") != VERSION:
            raise FormatError(f"manifest version {doc.get('version')!r} not supported")
        try:
            size = doc["virtual_size"]
            if not isinstance(size, int) or size < 0:
                raise FormatError(f"bad virtual_size {size!r}")
            parent = doc["parent_id"]
            if doc["kind"] not in ("full", "incremental"):
                raise FormatError(f"bad kind {doc['kind']!r}")
            extents = tuple(ManifestExtent.from_json(x) for x in doc["extents"])
            m = cls(
                backup_id=check_uuid(doc["backup_id"], "backup id"),
                volume_id=check_uuid(doc["volume_id"], "volume id"),
                virtual_size=size,
                created_at=str(doc["created_at"]),
                parent_id=None if parent is None else check_uuid(parent, "parent id"),
                kind=doc["kind"],
                source_chain=tuple(
                    SourceLayer(str(s["name"]), str(s["format"])) for s in doc["source_chain"]
                ),
                read_bytes=int(doc["read_bytes"]),
                extents=extents,
                fallback_reason=doc.get("fallback_reason"),
                checkpoint=Checkpoint.from_json(doc.get("checkpoint")),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"manifest field missing or mistyped: {exc}") from None
        pos = 0
        for e in extents:
            if e.offset < pos or e.offset + e.length > size:
                raise FormatError(f"extent {e.to_json()} overlaps or exceeds the disk")
            pos = e.offset + e.length
        return m
