"""One layer of a chain, read alone: qcow2 (L1/L2, subclusters, compression) or raw.

A layer answers two questions: "what does this layer itself say about [offset, +length)?"
as a sequence of runs, and "give me the bytes of that run". The chain combines layers.
Runs of adjacent clusters with contiguous host offsets are merged here so the chain can
read them with one ``preadv`` instead of one syscall per cluster.
"""

from __future__ import annotations

import errno
import os
import re
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator

import zstandard

from qcow2._header import COMPRESSION_ZSTD, Header
from qcow2.errors import CorruptImage, UnsafeImage

# Run kinds (ints, not an Enum: this is the hot loop).
K_DATA = 0
K_ZERO = 1
K_UNALLOC = 2
K_COMPRESSED = 3

#: (virtual offset, length, kind, host) where host is the host offset for K_DATA and the raw
#: L2 entry for K_COMPRESSED (one run per compressed cluster), 0 otherwise.
Run = tuple[int, int, int, int]

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
_MAX_PREAD = 1 << 30
#: Bytes of L2 tables cached per layer (bounded LRU).
L2_CACHE_BYTES = 8 * 1024 * 1024
_ZSTD_MAX_WINDOW = 1 << 25
#: Finds the next non-zero byte of an L2 table: skips unallocated entries at C speed, so a
#: mostly empty overlay costs little per layer in a deep chain.
_NONZERO = re.compile(rb"[^\x00]")
_ZERO_TABLE = bytes(1 << 21)


def _next_used(raw: bytes, first: int, stop: int, width: int) -> int:
    """Index of the first non-empty L2 entry in [first, stop), or ``stop``."""
    a, b = first * width, stop * width
    if raw[a:b] == _ZERO_TABLE[: b - a]:
        return stop
    m = _NONZERO.search(raw, a, b)
    return m.start() // width if m else stop


def _empty_run(raw: bytes, l2i: int, pos: int, end: int, cb: int, width: int) -> tuple[int, int]:
    """Skip the run of empty L2 entries starting at ``l2i`` (guest offset ``pos``) at once.

    Returns the guest offset where the run stops (``end`` at most) and the L2 index after it.
    """
    cend = min(end, ((pos >> cb) + 1) << cb)
    nxt = _next_used(raw, l2i, l2i + ((end - 1) >> cb) - (pos >> cb) + 1, width)
    stop = min(end, cend + ((nxt - l2i - 1) << cb))
    return stop, l2i + ((stop - 1) >> cb) - (pos >> cb) + 1


def _be_u64(data: bytes) -> array[int]:
    """Big-endian u64 table to an array (8 bytes per entry, not a Python int per entry)."""
    arr = array("Q")
    arr.frombytes(data)
    if array("H", [1]).tobytes() == b"\x01\x00":
        arr.byteswap()
    return arr


class _File:
    """An fd opened on first use and checked to be the very file that was inspected."""

    def __init__(self, path: str, ident: tuple[int, int]) -> None:
        self.path = path
        self._ident = ident
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._ident:
                os.close(fd)
                raise UnsafeImage(self.path, "changed", "file replaced after inspection")
            self._fd = fd
        return self._fd

    def pread_into(self, host: int, view: memoryview) -> None:
        """Fill ``view`` from ``host``; bytes past EOF read as zeros (like QEMU)."""
        fd = self.fd()
        got = 0
        total = len(view)
        while got < total:
            n = os.preadv(fd, [view[got : got + _MAX_PREAD]], host + got)
            if n <= 0:
                view[got:] = bytes(total - got)
                return
            got += n

    def pread(self, host: int, length: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(host, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Layer:
    """Interface shared by the qcow2 and raw layers."""

    file: _File
    virtual_size: int

    def runs(self, voff: int, length: int, want_zero: bool = False) -> Iterator[Run]:
        raise NotImplementedError

    def cluster(self, entry: int) -> bytes:
        """Decompressed content of a compressed cluster (K_COMPRESSED runs only)."""
        raise NotImplementedError

    def close(self) -> None:
        self.file.close()


class RawLayer(Layer):
    """A raw file: every byte is data; holes are reported as zero only for allocation maps."""

    def __init__(self, path: str, ident: tuple[int, int], size: int) -> None:
        self.file = _File(path, ident)
        self.virtual_size = size

    def runs(self, voff: int, length: int, want_zero: bool = False) -> Iterator[Run]:
        if not want_zero:
            yield (voff, length, K_DATA, voff)
            return
        yield from _host_runs(self.file.fd(), voff, length, voff)


class Qcow2Layer(Layer):
    """A qcow2 layer: L1/L2 lookups with a bounded L2 cache, subclusters, compression."""

    def __init__(self, path: str, ident: tuple[int, int], header: Header, file_size: int) -> None:
        self.file = _File(path, ident)
        self.header = header
        self.virtual_size = header.size
        self.file_size = file_size
        self._l1: array[int] | None = None
        self._l2: OrderedDict[int, tuple[array[int], bytes]] = OrderedDict()
        self._l2_max = max(2, L2_CACHE_BYTES >> header.cluster_bits)
        self._zcache: OrderedDict[int, bytes] = OrderedDict()

    def l1(self) -> array[int]:
        if self._l1 is None:
            h = self.header
            self._l1 = _be_u64(self.file.pread(h.l1_offset, h.l1_size * 8))
        return self._l1

    def l2(self, offset: int) -> tuple[array[int], bytes]:
        """An L2 table as entries and as raw bytes (for the zero-skipping search)."""
        got = self._l2.get(offset)
        if got is not None:
            self._l2.move_to_end(offset)
            return got
        cs = self.header.cluster_size
        if offset % cs or offset + cs > self.file_size:
            raise CorruptImage(f"{self.file.path}: L2 table offset {offset:#x} invalid")
        raw = self.file.pread(offset, cs)
        got = (_be_u64(raw), raw)
        self._l2[offset] = got
        if len(self._l2) > self._l2_max:
            self._l2.popitem(last=False)
        return got

    def runs(self, voff: int, length: int, want_zero: bool = False) -> Iterator[Run]:
        """Merged runs for [voff, voff+length), which must lie inside the virtual size.

        ``want_zero`` (allocation maps): allocated clusters whose host range is a hole in
        the image file are ZERO, as QEMU reads them. Why: Cinder creates qcow2 volumes with
        ``preallocation=metadata``, every cluster allocated and none written, and a full
        backup would otherwise read the whole virtual size."""
        if not want_zero:
            yield from self._runs(voff, length)
            return
        fd = self.file.fd()
        for start, n, kind, host in self._runs(voff, length):
            if kind == K_DATA:
                yield from _host_runs(fd, start, n, host)
            else:
                yield (start, n, kind, host)

    def _runs(self, voff: int, length: int) -> Iterator[Run]:
        h = self.header
        cb = h.cluster_bits
        l2n = h.l2_entries
        v3 = h.version >= 3
        ext = h.extended_l2
        l1 = self.l1()
        end = voff + length
        pos = voff
        p_start = p_len = p_kind = p_host = -1
        while pos < end:
            cidx = pos >> cb
            l1i, l2i = divmod(cidx, l2n)
            span_end = min(end, ((l1i + 1) * l2n) << cb)
            l2off = l1[l1i] & L1_OFFSET_MASK if l1i < len(l1) else 0
            if l2off == 0:
                pieces: list[Run] = [(pos, span_end - pos, K_UNALLOC, 0)]
                pos = span_end
            else:
                tbl, raw = self.l2(l2off)
                if ext:
                    pieces = self._ext_pieces(tbl, raw, pos, span_end, l2i)
                else:
                    pieces = self._std_pieces(tbl, raw, pos, span_end, l2i, v3)
                pos = span_end
            for start, n, kind, host in pieces:
                if (
                    kind == p_kind
                    and kind != K_COMPRESSED
                    and (kind != K_DATA or p_host + p_len == host)
                ):
                    p_len += n
                    continue
                if p_kind >= 0:
                    yield (p_start, p_len, p_kind, p_host)
                p_start, p_len, p_kind, p_host = start, n, kind, host
        if p_kind >= 0:
            yield (p_start, p_len, p_kind, p_host)

    def _std_pieces(
        self, tbl: array[int], raw: bytes, pos: int, end: int, l2i: int, v3: bool
    ) -> list[Run]:
        cb = self.header.cluster_bits
        cmask = (1 << cb) - 1
        out: list[Run] = []
        while pos < end:
            cend = min(end, ((pos >> cb) + 1) << cb)
            e = tbl[l2i]
            if e == 0:
                stop, l2i = _empty_run(raw, l2i, pos, end, cb, 8)
                out.append((pos, stop - pos, K_UNALLOC, 0))
                pos = stop
                continue
            l2i += 1
            if e & L2_COMPRESSED:
                out.append((pos, cend - pos, K_COMPRESSED, e))
            else:
                off = e & L2_OFFSET_MASK
                if v3 and e & L2_ZERO:
                    out.append((pos, cend - pos, K_ZERO, 0))
                elif off == 0:
                    out.append((pos, cend - pos, K_UNALLOC, 0))
                else:
                    if off & cmask:
                        raise CorruptImage(
                            f"{self.file.path}: data cluster {off:#x} unaligned "
                            f"(L2 index {l2i - 1})"
                        )
                    out.append((pos, cend - pos, K_DATA, off + (pos & cmask)))
            pos = cend
        return out

    def _ext_pieces(self, tbl: array[int], raw: bytes, pos: int, end: int, l2i: int) -> list[Run]:
        """Extended L2: 32 subclusters per cluster with allocation and zero bitmaps."""
        cb = self.header.cluster_bits
        sb = cb - 5
        cmask = (1 << cb) - 1
        out: list[Run] = []
        while pos < end:
            cend = min(end, ((pos >> cb) + 1) << cb)
            e = tbl[2 * l2i]
            bitmap = tbl[2 * l2i + 1]
            if e == 0 and bitmap == 0:
                stop, l2i = _empty_run(raw, l2i, pos, end, cb, 16)
                out.append((pos, stop - pos, K_UNALLOC, 0))
                pos = stop
                continue
            l2i += 1
            if e & L2_COMPRESSED:
                out.append((pos, cend - pos, K_COMPRESSED, e))
                pos = cend
                continue
            off = e & L2_OFFSET_MASK
            alloc = bitmap & 0xFFFFFFFF
            zero = bitmap >> 32
            if alloc & zero or (alloc and off == 0) or (off & cmask):
                raise CorruptImage(
                    f"{self.file.path}: extended L2 entry {l2i - 1} invalid "
                    f"(offset {off:#x}, bitmap {bitmap:#x})"
                )
            while pos < cend:
                sc = (pos & cmask) >> sb
                bit = 1 << sc
                kind = K_DATA if alloc & bit else K_ZERO if zero & bit else K_UNALLOC
                # extend over following subclusters of the same kind
                sc_end = sc + 1
                while sc_end < 32:
                    b2 = 1 << sc_end
                    k2 = K_DATA if alloc & b2 else K_ZERO if zero & b2 else K_UNALLOC
                    if k2 != kind:
                        break
                    sc_end += 1
                stop = min(cend, ((pos >> cb) << cb) + (sc_end << sb))
                host = off + (pos & cmask) if kind == K_DATA else 0
                out.append((pos, stop - pos, kind, host))
                pos = stop
        return out

    def cluster(self, entry: int) -> bytes:
        got = self._zcache.get(entry)
        if got is not None:
            return got
        h = self.header
        cb = h.cluster_bits
        cs = 1 << cb
        x = 62 - (cb - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        csize = sectors * 512 - (host & 511)
        if host >= self.file_size or host == 0:
            raise CorruptImage(f"{self.file.path}: compressed cluster at {host:#x} past EOF")
        data = self.file.pread(host, min(csize, self.file_size - host))
        out = self._decompress(data, cs, host)
        self._zcache[entry] = out
        if len(self._zcache) > 8:
            self._zcache.popitem(last=False)
        return out

    def _decompress(self, data: bytes, cs: int, host: int) -> bytes:
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
                reader = dctx.stream_reader(data, read_across_frames=True)
                parts: list[bytes] = []
                got = 0
                for _ in range(64):  # bounded: each read returns >0 bytes or ends
                    chunk = reader.read(cs - got)
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
                    if got >= cs:
                        break
                out = b"".join(parts)
            else:
                out = zlib.decompressobj(-15).decompress(data, cs)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise CorruptImage(
                f"{self.file.path}: compressed cluster at {host:#x} undecodable: {exc}"
            ) from None
        if len(out) != cs:
            raise CorruptImage(
                f"{self.file.path}: compressed cluster at {host:#x} decodes to {len(out)} bytes"
            )
        return out


def _host_runs(fd: int, voff: int, length: int, host: int) -> Iterator[Run]:
    """Guest [voff, voff+length) stored at host [host, host+length) of ``fd``, split where
    the host file has holes (ZERO: QEMU reads zeros there) and data (DATA)."""
    pos, end = host, host + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        if data > pos:
            yield (voff + pos - host, data - pos, K_ZERO, 0)
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        if hole <= pos:  # cannot happen on a sane fs; never loop forever
            hole = end
        yield (voff + pos - host, hole - pos, K_DATA, pos)
        pos = hole
