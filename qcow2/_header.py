"""Parse and bound-check a qcow2 header, its extensions and feature bits.

Everything a reader later trusts (table offsets, sizes, the backing name) is checked here
against the file size and hard limits, so that a hostile header cannot make us allocate
gigabytes, seek outside the file, or loop. Every rejection is an :class:`UnsafeImage`
naming the file and the rule, because a header that breaks these rules is never opened.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from qcow2.errors import UnsafeImage

MAGIC = b"QFI\xfb"

# Incompatible feature bits (docs/interop/qcow2.txt).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU's own limits (block/qcow2.h): an L1 table of at most 32 MiB, a refcount table of at
#: most 8 MiB, at most 65536 snapshots, a backing name of at most 1023 bytes.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
#: Largest virtual size we accept (QEMU's is 2^55 bytes minus change; 1 PiB is plenty).
MAX_VIRTUAL_SIZE = 1 << 50
MAX_EXTENSIONS = 64
SNAPSHOT_ENTRY_MIN = 40
BITMAPS_EXT_LEN = 24

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes following the v2 part

_Bad = Callable[[str, str], UnsafeImage]


@dataclass(frozen=True)
class Header:
    """The fields of a qcow2 header a reader and the policy need, already bound-checked."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    refcount_offset: int
    refcount_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int
    compression_type: int
    header_length: int
    backing_name: str | None
    backing_fmt: str | None
    has_data_file_ext: bool
    has_bitmaps_ext: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table: extended entries are 16 bytes instead of 8."""
        return self.cluster_size // (16 if self.extended_l2 else 8)


def l1_entries_needed(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """How many L1 entries a virtual size needs; more is a sign of a hostile header."""
    per_l2 = (1 << cluster_bits) // (16 if extended_l2 else 8)
    span = per_l2 << cluster_bits
    return (size + span - 1) // span


def parse_header(path: str, buf: bytes, file_size: int) -> Header:
    """Parse ``buf`` (the first cluster of the file, or all of it if shorter).

    Raises :class:`UnsafeImage` for anything that is malformed, unsupported or out of bounds.
    """

    def bad(rule: str, detail: str) -> UnsafeImage:
        return UnsafeImage(path, rule, detail)

    if len(buf) < _V2.size:
        raise bad("header", f"file too short for a qcow2 header ({len(buf)} bytes)")
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        refcount_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf, 0)
    if magic != MAGIC:
        raise bad("format", "not a qcow2 file (bad magic)")
    if version not in (2, 3):
        raise bad("version", f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad("cluster-size", f"cluster_bits {cluster_bits} outside 9..21")
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise bad("encryption", f"encrypted image (method {crypt_method}) not supported")
    if size > MAX_VIRTUAL_SIZE:
        raise bad("virtual-size", f"virtual size {size} exceeds {MAX_VIRTUAL_SIZE}")

    incompatible = 0
    refcount_order = 4
    header_length = _V2.size
    compression_type = COMPRESSION_ZLIB
    if version == 3:
        if len(buf) < _V2.size + _V3.size:
            raise bad("header", "file too short for a qcow2 v3 header")
        incompatible, _compat, _autoclear, refcount_order, header_length = _V3.unpack_from(
            buf, _V2.size
        )
        if header_length < 104 or header_length % 8 or header_length > min(len(buf), 4096):
            raise bad("header", f"header_length {header_length} invalid")
        if header_length > 104:
            compression_type = buf[104]
    if refcount_order > 6:
        raise bad("refcount-order", f"refcount_order {refcount_order} > 6")
    if incompatible & ~KNOWN_INCOMPAT:
        raise bad("unknown-features", f"unknown incompatible features {incompatible:#x}")
    if incompatible & INCOMPAT_DATA_FILE:
        raise bad("data-file", "external data file feature bit set")
    if incompatible & INCOMPAT_CORRUPT:
        raise bad("corrupt-flag", "image is marked corrupt by QEMU")
    if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise bad("compression-type", f"unknown compression type {compression_type}")
    if compression_type != COMPRESSION_ZLIB and not incompatible & INCOMPAT_COMPRESSION:
        raise bad("compression-type", "compression type set without its feature bit")
    extended_l2 = bool(incompatible & INCOMPAT_EXTL2)

    _check_tables(
        bad,
        file_size,
        cluster_size,
        size=size,
        l1_size=l1_size,
        l1_offset=l1_offset,
        needed=l1_entries_needed(size, cluster_bits, extended_l2),
        refcount_offset=refcount_offset,
        refcount_clusters=refcount_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
    )

    backing_name = None
    if backing_offset:
        if backing_size == 0 or backing_size > MAX_BACKING_NAME:
            raise bad("backing-name", f"backing name length {backing_size} invalid")
        if backing_offset + backing_size > min(len(buf), cluster_size):
            raise bad("backing-name", "backing name lies outside the first cluster")
        raw_name = buf[backing_offset : backing_offset + backing_size]
        try:
            backing_name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("backing-name", "backing name is not UTF-8") from None
        if "\x00" in backing_name:
            raise bad("backing-name", "backing name contains NUL")

    ext_start = header_length if version == 3 else _V2.size
    limit = min(len(buf), cluster_size)
    if backing_offset and backing_offset >= ext_start:
        limit = min(limit, backing_offset)
    backing_fmt, has_data_file, has_bitmaps = _parse_extensions(
        bad, buf, ext_start, limit, file_size, version
    )
    if has_data_file:
        raise bad("data-file", "external data file header extension present")
    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_offset=l1_offset,
        refcount_offset=refcount_offset,
        refcount_clusters=refcount_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible=incompatible,
        compression_type=compression_type,
        header_length=header_length,
        backing_name=backing_name,
        backing_fmt=backing_fmt,
        has_data_file_ext=has_data_file,
        has_bitmaps_ext=has_bitmaps,
    )


def _check_tables(
    bad: _Bad,
    file_size: int,
    cluster_size: int,
    *,
    size: int,
    l1_size: int,
    l1_offset: int,
    needed: int,
    refcount_offset: int,
    refcount_clusters: int,
    nb_snapshots: int,
    snapshots_offset: int,
) -> None:
    """Every table must be cluster aligned, lie inside the file and be no bigger than needed."""
    if l1_size < needed:
        raise bad("l1-table", f"L1 has {l1_size} entries, virtual size {size} needs {needed}")
    # QEMU keeps a larger L1 after a shrink; allow slack but never more than its hard limit.
    if l1_size * 8 > MAX_L1_BYTES or l1_size > max(needed, 1) * 2 + 64:
        raise bad("l1-table", f"L1 has {l1_size} entries, virtual size needs {needed}")
    _check_region(bad, "l1-table", l1_offset, l1_size * 8, file_size, cluster_size)
    if refcount_clusters == 0 or refcount_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise bad("refcount-table", f"refcount table of {refcount_clusters} clusters")
    _check_region(
        bad,
        "refcount-table",
        refcount_offset,
        refcount_clusters * cluster_size,
        file_size,
        cluster_size,
    )
    if nb_snapshots > MAX_SNAPSHOTS:
        raise bad("snapshot-table", f"{nb_snapshots} snapshots exceed {MAX_SNAPSHOTS}")
    if nb_snapshots:
        _check_region(
            bad,
            "snapshot-table",
            snapshots_offset,
            nb_snapshots * SNAPSHOT_ENTRY_MIN,
            file_size,
            cluster_size,
        )


def _check_region(
    bad: _Bad, rule: str, offset: int, length: int, file_size: int, cluster_size: int
) -> None:
    if length == 0:
        return
    if offset == 0 or offset % cluster_size:
        raise bad(rule, f"table offset {offset:#x} not cluster aligned or zero")
    if offset + length > file_size:
        raise bad(rule, f"table [{offset:#x}, +{length}) ends past EOF ({file_size})")


def _parse_extensions(
    bad: _Bad, buf: bytes, pos: int, limit: int, file_size: int, version: int
) -> tuple[str | None, bool, bool]:
    """Walk the extension list; bounded by the first cluster and MAX_EXTENSIONS."""
    backing_fmt: str | None = None
    has_data_file = False
    has_bitmaps = False
    for _ in range(MAX_EXTENSIONS):
        if pos + 8 > limit:
            # v2 images written by old tools may end the header without a terminator.
            return backing_fmt, has_data_file, has_bitmaps
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_type == EXT_END:
            return backing_fmt, has_data_file, has_bitmaps
        if pos + ext_len > limit:
            raise bad("extension", f"extension {ext_type:#x} overruns the header cluster")
        data = buf[pos : pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            try:
                backing_fmt = data.decode("ascii")
            except UnicodeDecodeError:
                raise bad("backing-format", "backing format is not ASCII") from None
        elif ext_type == EXT_DATA_FILE:
            has_data_file = True
        elif ext_type == EXT_CRYPTO:
            raise bad("encryption", "full disk encryption extension present")
        elif ext_type == EXT_BITMAPS:
            has_bitmaps = True
            if version < 3 or ext_len < BITMAPS_EXT_LEN:
                raise bad("bitmaps", "bitmaps extension malformed")
            _nb, _res, dir_size, dir_off = struct.unpack_from(">IIQQ", data, 0)
            if dir_off + dir_size > file_size or dir_size > MAX_L1_BYTES:
                raise bad("bitmaps", "bitmap directory lies past EOF")
        pos += (ext_len + 7) & ~7
    raise bad("extension", f"more than {MAX_EXTENSIONS} header extensions")
