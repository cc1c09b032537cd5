"""Manifests read piecemeal: the header without the extents, the extents one at a time.

A manifest of a 1 TiB volume holds ~260,000 extents (~20 MB of JSON, ~200 MB as Python
objects). Listing, retention and garbage collection need only the header of each backup
and, for GC, each backup's chunk ids once; loading 100 such manifests at once would take
gigabytes. The writer (:meth:`Manifest.to_json`) always puts ``"extents"`` LAST, so:

- :func:`read_header` reads up to ``"extents":[`` and parses that prefix closed with an
  empty list (a key can only appear unescaped outside strings, so the marker is found only
  where the writer put it);
- :func:`iter_extents` walks the array element by element with ``raw_decode`` over a
  bounded buffer, validating each as :meth:`Manifest.loads` does (order, bounds).

A manifest not in that layout (hand-made: ``"extents"`` not last) falls back to a whole
:meth:`Manifest.loads`, so any valid manifest still reads.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Literal

from hostagent.backup.repo.format import (
    Checkpoint,
    FormatError,
    Manifest,
    ManifestExtent,
    SourceLayer,
)

MARKER = b'"extents":['
_BLOCK = 1 << 16
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ManifestHeader:
    """Everything of a manifest but its extents (what listing and retention use).

    ``data_bytes``/``chunks``: written since manifests carry them (None in older ones).
    """

    backup_id: str
    volume_id: str
    virtual_size: int
    created_at: str
    parent_id: str | None
    kind: Literal["full", "incremental"]
    source_chain: tuple[SourceLayer, ...]
    read_bytes: int
    fallback_reason: str | None
    checkpoint: Checkpoint | None
    version: int
    data_bytes: int | None = None
    chunks: int | None = None


def _header_of(m: Manifest, data_bytes: int | None, chunks: int | None) -> ManifestHeader:
    return ManifestHeader(
        m.backup_id, m.volume_id, m.virtual_size, m.created_at, m.parent_id, m.kind,
        m.source_chain, m.read_bytes, m.fallback_reason, m.checkpoint, m.version,
        data_bytes, chunks,
    )  # fmt: skip


def _prefix(f: IO[bytes]) -> bytes | None:
    """The bytes before the extents array's first element, or None if not in our layout."""
    buf = b""
    while True:
        block = f.read(_BLOCK)
        buf += block
        at = buf.find(MARKER)
        if at >= 0:
            f.seek(at + len(MARKER))
            return buf[:at]
        if not block or len(buf) > 16 * _BLOCK:  # headers are small: not our layout
            return None


def read_header(f: IO[bytes]) -> ManifestHeader:
    """The header of the manifest open in ``f`` (binary, at its start)."""
    prefix = _prefix(f)
    if prefix is None:
        f.seek(0)
        m = Manifest.loads(f.read())
        return _header_of(m, m.data_bytes(), len(m.chunk_ids()))
    try:
        doc = json.loads(prefix + b'"extents":[]}')
    except ValueError as exc:
        raise FormatError(f"manifest header is not JSON: {exc}") from None
    m = Manifest.from_doc(doc)  # validates every header field
    data, chunks = doc.get("data_bytes"), doc.get("chunks")
    if data is not None and (not isinstance(data, int) or data < 0):
        raise FormatError(f"bad data_bytes {data!r}")
    if chunks is not None and (not isinstance(chunks, int) or chunks < 0):
        raise FormatError(f"bad chunks {chunks!r}")
    return _header_of(m, data, chunks)


class _Text:
    """A decoded window over the file: ``text[i:]`` is what is not consumed yet."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.text, self.i = f, "", 0
        self._dec = codecs.getincrementaldecoder("utf-8")()

    def fill(self) -> bool:
        more = self.f.read(_BLOCK)
        self.text = self.text[self.i :] + self._dec.decode(more, final=not more)
        self.i = 0
        return bool(more)

    def skip_ws(self) -> str:
        """The next non-blank character (not consumed); FormatError at the end of file."""
        while True:
            while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
                self.i += 1
            if self.i < len(self.text):
                return self.text[self.i]
            if not self.fill():
                raise FormatError("manifest ends inside its extents")

    def value(self) -> object:
        """One JSON value (an extent is a self-delimiting array)."""
        while True:
            try:
                item, self.i = _DECODER.raw_decode(self.text, self.i)
                return item
            except json.JSONDecodeError:
                if not self.fill():
                    raise FormatError("manifest ends inside an extent") from None

    def rest(self) -> str:
        while self.fill():
            pass
        return self.text[self.i :]


def iter_extents(f: IO[bytes], virtual_size: int) -> Iterator[ManifestExtent]:
    """The extents of the manifest open in ``f``, one at a time (bounded memory)."""
    f.seek(0)
    if _prefix(f) is None:
        f.seek(0)
        yield from Manifest.loads(f.read()).extents
        return
    t, first, end_of_last = _Text(f), True, 0
    while True:
        c = t.skip_ws()
        if c == "]":
            t.i += 1
            if t.rest().strip() != "}":
                raise FormatError("manifest: data after the extents (not written by qsnap)")
            return
        if not first:
            if c != ",":
                raise FormatError(f"manifest extents: ',' expected, found {c!r}")
            t.i += 1
            t.skip_ws()
        e = ManifestExtent.from_json(t.value())
        first = False
        if e.offset < end_of_last or e.offset + e.length > virtual_size:
            raise FormatError(f"extent {e.to_json()} overlaps or exceeds the disk")
        end_of_last = e.offset + e.length
        yield e


def chunk_ids(f: IO[bytes], virtual_size: int) -> Iterator[str]:
    """The chunk ids a manifest references (repeats included), streamed."""
    for e in iter_extents(f, virtual_size):
        if e.chunk is not None:
            yield e.chunk
