"""Chunk encoding: a zstd frame always, compressed only when compression pays.

Every chunk file is one standard zstd frame (RFC 8878), so any zstd decoder restores it
and the repository format stays version 1. Compressing data zstd cannot shrink (random,
already compressed or encrypted guest data) costs most of a backup's CPU for nothing, so
a chunk whose samples do not compress is stored as a frame of RAW blocks: a 9-byte frame
header plus a 3-byte header per 128 KiB block, written with ``writev`` straight from the
read buffer (no copy). Decoding a raw frame is a memcpy.
"""

from __future__ import annotations

import struct

import zstandard

_MAGIC = struct.pack("<I", 0xFD2FB528)
# Frame_Header_Descriptor: FCS field 4 bytes (flag 2), Single_Segment (no window
# descriptor; window = content size), no checksum, no dictionary.
_FHD = bytes([0x80 | 0x20])
RAW_BLOCK = 128 * 1024  # zstd's maximum block size
_SAMPLES = 8
_SAMPLE = 8 * 1024
# A sample "compresses" when level 1 saves more than this fraction of it.
_WORTH = 0.03

Buffer = bytes | bytearray | memoryview


def worth_compressing(data: Buffer, probe: zstandard.ZstdCompressor) -> bool:
    """True unless every one of a few spread samples is incompressible.

    One compressible sample is enough to compress the whole chunk, so a chunk of mixed
    content is never stored raw by mistake; only uniformly incompressible data is.
    """
    n = len(data)
    if n <= _SAMPLES * _SAMPLE:
        return len(probe.compress(data)) < n * (1 - _WORTH)
    view = memoryview(data)
    step = (n - _SAMPLE) // (_SAMPLES - 1)
    for k in range(_SAMPLES):
        s = view[k * step : k * step + _SAMPLE]
        if len(probe.compress(s)) < _SAMPLE * (1 - _WORTH):
            return True
    return False


def raw_frame(data: Buffer) -> list[Buffer]:
    """The buffers of a zstd frame holding ``data`` in raw blocks (for ``os.writev``)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if not 0 < n < 1 << 32:
        raise ValueError(f"raw frame of {n} bytes")
    parts: list[Buffer] = [_MAGIC + _FHD + struct.pack("<I", n)]
    for off in range(0, n, RAW_BLOCK):
        size = min(RAW_BLOCK, n - off)
        last = 1 if off + size == n else 0
        parts.append((last | (size << 3)).to_bytes(3, "little"))  # Block_Type 0 = Raw
        parts.append(view[off : off + size])
    return parts


def raw_frame_into(frame: memoryview, out: bytearray) -> int | None:
    """If ``frame`` is exactly a raw-block frame as :func:`raw_frame` writes it, copy its
    content into ``out`` and return the length; None for any other frame (zstd decodes it).
    """
    if len(frame) < 9 or frame[:5] != _MAGIC + _FHD:
        return None
    n = int.from_bytes(frame[5:9], "little")
    if n > len(out):
        return None
    pos, got = 9, 0
    while True:
        if pos + 3 > len(frame):
            return None
        head = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        pos += 3
        if kind != 0 or pos + size > len(frame) or got + size > n:
            return None
        out[got : got + size] = frame[pos : pos + size]
        pos, got = pos + size, got + size
        if last:
            break
    return n if got == n and pos == len(frame) else None
