"""A whole backing chain as the guest sees it: reads and allocation maps.

A range not allocated in a layer falls through to the next layer down; a range past the
end of a shorter backing layer reads as zeros and is reported unallocated (QEMU does the
same). Only :func:`qcow2.inspect_chain` builds a :class:`Chain`, so every layer here has
already passed the safety policy.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from qcow2._layer import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO, Layer

_ZEROS = memoryview(bytes(1 << 20))
#: Reads resolve the chain one window at a time and keep the last window's map, so a deep
#: chain is walked once per window instead of once per read call (layers are frozen).
_WINDOW = 64 << 20


class ExtentKind(enum.Enum):
    DATA = "data"
    ZERO = "zero"
    UNALLOCATED = "unallocated"


@dataclass(frozen=True)
class Extent:
    """A range of the virtual disk; ``depth`` 0 is the top layer, None when no layer has it."""

    offset: int
    length: int
    kind: ExtentKind
    depth: int | None


@dataclass(frozen=True)
class LayerInfo:
    """What inspection learned about one file of the chain."""

    path: str
    fmt: str
    virtual_size: int
    file_size: int
    backing_name: str | None
    backing_fmt: str | None
    cluster_size: int | None
    version: int | None


#: (virtual offset, length, run kind, depth or -1, host offset / compressed L2 entry)
_Piece = tuple[int, int, int, int, int]


class Chain:
    """Guest-visible view of an inspected chain. A context manager; fds open lazily."""

    def __init__(self, layers: tuple[LayerInfo, ...], readers: list[Layer]) -> None:
        self.layers = layers
        self._readers = readers
        self.virtual_size = layers[0].virtual_size
        self._win: tuple[int, list[_Piece], list[int]] | None = None

    def __enter__(self) -> Chain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0 or offset > self.virtual_size:
            raise ValueError(f"range [{offset}, +{length}) outside disk of {self.virtual_size}")
        return min(length, self.virtual_size - offset)

    def _pieces(self, depth: int, voff: int, length: int, want_zero: bool) -> Iterator[_Piece]:
        """Resolve a range through layers ``depth`` and below."""
        reader = self._readers[depth]
        inside = max(0, min(length, reader.virtual_size - voff))
        if inside:
            last = depth + 1 == len(self._readers)
            for start, n, kind, host in reader.runs(voff, inside, want_zero):
                if kind != K_UNALLOC:
                    yield (start, n, kind, depth, host)
                elif last:
                    yield (start, n, K_UNALLOC, -1, 0)
                else:
                    yield from self._pieces(depth + 1, start, n, want_zero)
        if inside < length:  # past the end of this (shorter) layer: zeros, unallocated
            yield (voff + inside, length - inside, K_UNALLOC, -1, 0)

    def read(self, offset: int, length: int) -> bytes:
        """Guest-visible bytes of [offset, offset+length), clipped to the virtual size."""
        n = self._clip(offset, length)
        buf = bytearray(n)
        self._fill(offset, memoryview(buf), zeroed=True)
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the byte count (short at the disk's end)."""
        n = self._clip(offset, len(buf))
        self._fill(offset, memoryview(buf)[:n], zeroed=False)
        return n

    def _fill(self, offset: int, view: memoryview, zeroed: bool) -> None:
        if not len(view):
            return
        for start, n, kind, depth, host in self._resolved(offset, len(view)):
            a = start - offset
            if kind == K_DATA:
                self._readers[depth].file.pread_into(host, view[a : a + n])
            elif kind == K_COMPRESSED:
                reader = self._readers[depth]
                data = reader.cluster(host)
                within = start & (len(data) - 1)
                view[a : a + n] = data[within : within + n]
            elif not zeroed:
                _zero(view[a : a + n])

    def _resolved(self, offset: int, length: int) -> Iterator[_Piece]:
        """Like ``_pieces(0, ...)`` for reads, served from the cached window map."""
        end = offset + length
        pos = offset
        while pos < end:
            ws = pos - pos % _WINDOW
            if self._win is None or self._win[0] != ws:
                wl = min(_WINDOW, self.virtual_size - ws)
                pieces = list(self._pieces(0, ws, wl, False))
                self._win = (ws, pieces, [p[0] for p in pieces])
            _ws, pieces, starts = self._win
            i = bisect_right(starts, pos) - 1
            wend = min(end, ws + _WINDOW)
            while pos < wend:
                start, n, kind, depth, host = pieces[i]
                stop = min(start + n, wend)
                if kind == K_DATA:
                    host += pos - start
                yield (pos, stop - pos, kind, depth, host)
                pos = stop
                i += 1

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Merged allocation map of the chain, like ``qemu-img map``.

        A raw bottom layer's holes are ZERO (QEMU reports them so); compressed clusters are
        DATA; ranges no layer allocates (or past a shorter backing layer) are UNALLOCATED.
        """
        if length is None:
            length = self.virtual_size - offset
        n = self._clip(offset, length)
        if n:
            yield from _merge(self._pieces(0, offset, n, True))

    def layer_extents(self, depth: int) -> Iterator[Extent]:
        """Allocation map of layer ``depth`` alone, over that layer's own virtual size.

        Exactly the ranges this layer itself allocates (DATA or ZERO, with ``depth``), so an
        incremental backup reads only what changed above a boundary.
        """
        reader = self._readers[depth]
        if reader.virtual_size:
            runs = reader.runs(0, reader.virtual_size, True)
            yield from _merge((s, n, k, depth if k != K_UNALLOC else -1, h) for s, n, k, h in runs)


_KINDS = {
    K_DATA: ExtentKind.DATA,
    K_COMPRESSED: ExtentKind.DATA,
    K_ZERO: ExtentKind.ZERO,
    K_UNALLOC: ExtentKind.UNALLOCATED,
}


def _merge(pieces: Iterator[_Piece]) -> Iterator[Extent]:
    cur: Extent | None = None
    for start, n, kind, depth, _host in pieces:
        ek = _KINDS[kind]
        d = None if depth < 0 else depth
        if cur is not None and cur.kind is ek and cur.depth == d:
            cur = Extent(cur.offset, cur.length + n, ek, d)
            continue
        if cur is not None:
            yield cur
        cur = Extent(start, n, ek, d)
    if cur is not None:
        yield cur


def _zero(view: memoryview) -> None:
    pos = 0
    total = len(view)
    while pos < total:
        k = min(len(_ZEROS), total - pos)
        view[pos : pos + k] = _ZEROS[:k]
        pos += k
