"""A corpus of real images made at test time with qemu-img/qemu-io, plus a header writer.

qemu-img/qemu-io are the reference: every corpus image is later compared byte for byte with
``qemu-img convert -O raw`` and ``qemu-img map``. ``write_qcow2`` builds headers qemu-img
refuses to make (hostile ones). The corpus is built once per session in one directory; a
manifest lets a second test module reuse it instead of rebuilding.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

MiB = 1024 * 1024
_NS = uuid.UUID("5b0f8a3e-2f4d-4a55-9a43-3c5a0c7c0001")


def vol(tag: str) -> str:
    """A Cinder-style base name, deterministic per tag."""
    return f"volume-{uuid.uuid5(_NS, tag)}"


def snap(base: str, tag: str) -> str:
    return f"{base}.{uuid.uuid5(_NS, base + tag)}"


@dataclass(frozen=True)
class Image:
    name: str
    path: str
    fmt: str
    layers: int


def run(argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> str:
    res = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr}")
    return res.stdout


def qio(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run([*argv, str(path)])


def create(
    d: Path,
    name: str,
    size: str,
    *,
    backing: str | None = None,
    bfmt: str = "qcow2",
    opts: str = "",
) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", backing, "-F", bfmt]
    run([*argv, name, size], cwd=d)
    return d / name


def mixed_data(size: int, seed: int) -> bytes:
    """Half random, half text, with zero holes: exercises compression and zero detection."""
    rnd = random.Random(seed)
    out = bytearray(size)
    text = b"The quick brown fox jumps over the lazy qcow2 cluster. " * 64
    pos = 0
    while pos < size:
        n = min(rnd.choice((4096, 65536, 200000)), size - pos)
        choice = rnd.random()
        if choice < 0.4:
            out[pos : pos + n] = rnd.randbytes(n)
        elif choice < 0.75:
            out[pos : pos + n] = (text * (n // len(text) + 1))[:n]
        pos += n
    return bytes(out)


def convert(d: Path, src: str, name: str, *extra: str) -> Path:
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, src, name], cwd=d)
    return d / name


def build_corpus(d: Path) -> list[Image]:
    """Every case of issue 3's corpus; small (<= 16 MiB virtual) to keep the suite fast."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "src.raw").write_bytes(mixed_data(4 * MiB, 1))
    imgs: list[Image] = []

    def add(name: str, path: Path, layers: int, fmt: str = "qcow2") -> None:
        imgs.append(Image(name, str(path), fmt, layers))

    p = convert(d, "src.raw", vol("v2"), "-o", "compat=0.10")
    qio(p, "write -P 0xaa 100k 3k", "discard 1M 128k", "write -z 2M 64k")
    add("v2-64k", p, 1)

    p = create(d, vol("v3"), "4M")
    qio(p, "write -P 0x11 0 3M", "write -z 1M 256k", "discard 2M 64k", "write -z 3000k 4k")
    add("v3-64k", p, 1)

    p = convert(d, "src.raw", vol("c512"), "-o", "cluster_size=512")
    qio(p, "write -z 512 1536", "discard 8k 4k", "write -P 0x5c 1000k 700")
    add("v3-512", p, 1)

    p = create(d, vol("c2m"), "16M", opts="cluster_size=2M")
    qio(p, "write -P 0x21 1M 3M", "write -z 6M 2M", "write -P 0x22 10M 1k", "discard 2M 2M")
    add("v3-2m", p, 1)

    add("zlib", convert(d, "src.raw", vol("zlib"), "-c"), 1)
    add("zstd", convert(d, "src.raw", vol("zstd"), "-c", "-o", "compression_type=zstd"), 1)
    add("zlib-2m", convert(d, "src.raw", vol("zl2m"), "-c", "-o", "cluster_size=2M"), 1)
    add(
        "zstd-4k",
        convert(d, "src.raw", vol("zs4k"), "-c", "-o", "compression_type=zstd,cluster_size=4k"),
        1,
    )

    p = create(d, vol("ext"), "4M", opts="extended_l2=on,cluster_size=64k")
    qio(
        p,
        "write -P 0x31 4k 6k",
        "write -P 0x32 1M 200k",
        "write -z 1050k 8k",
        "discard 1100k 2k",
        "write -z 3M 128k",
    )
    add("extl2", p, 1)

    base = convert(d, "src.raw", vol("extb"))
    p = create(
        d, snap(base.name, "t"), "4M", backing=base.name, opts="extended_l2=on,cluster_size=128k"
    )
    qio(p, "write -P 0x41 4k 6k", "write -z 2500k 4k", "write -P 0x42 3M 300k", "discard 3100k 4k")
    add("extl2-chain", p, 2)

    p = convert(d, "src.raw", vol("bmp"))
    run(["qemu-img", "bitmap", "-f", "qcow2", "--add", str(p), "b0"])
    run(["qemu-img", "bitmap", "-f", "qcow2", "--add", str(p), "b1", "-g", "128k"])
    qio(p, "write -P 0x51 64k 64k")
    add("bitmaps", p, 1)

    # a 64-layer chain with mixed cluster sizes, v2 and v3 layers, zero and discarded ranges
    p = convert(d, "src.raw", vol("c64"))
    sizes = ("512", "4k", "64k", "2M", "64k", "1M")
    for i in range(1, 64):
        name = snap(vol("c64"), str(i))
        compat = ",compat=0.10" if i % 9 == 0 else ""
        p = create(d, name, "4M", backing=p.name, opts=f"cluster_size={sizes[i % 6]}{compat}")
        cmds = [f"write -P {i} {i * 61}k 9k"]
        if i % 5 == 0 and not compat:
            cmds.append(f"write -z {i * 47}k 70k")
        if i % 7 == 0:
            cmds.append(f"discard {i * 31}k 64k")
        qio(p, *cmds)
    add("chain64", p, 64)

    raw = d / vol("rawb")
    with open(raw, "wb") as f:
        f.truncate(3 * MiB)
        f.seek(MiB)
        f.write(mixed_data(MiB, 2))
    mid = create(d, snap(raw.name, "a"), "4M", backing=raw.name, bfmt="raw")
    qio(mid, "write -P 0x61 0 64k", "write -z 1M 64k")
    p = create(d, snap(raw.name, "b"), "4M", backing=mid.name, opts="compat=0.10")
    qio(p, "write -P 0x62 2M 1536")
    add("raw-base", p, 3)

    short = convert(d, "src.raw", vol("short"))
    run(["qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", str(short), "2M"])
    p = create(d, snap(short.name, "t"), "6M", backing=short.name)
    qio(p, "write -P 0x71 1900k 300k")
    add("short-backing", p, 2)

    cbase = convert(d, "src.raw", vol("cov"))
    p = create(d, snap(cbase.name, "t"), "4M", backing=cbase.name, opts="compression_type=zstd")
    qio(p, "write -c -P 0x44 0 64k", "write -c -P 0x45 1M 128k", "write -z 2M 64k")
    add("compressed-overlay", p, 2)

    qraw = d / vol("qraw")
    qraw.write_bytes(p.read_bytes()[: 2 * MiB].ljust(2 * MiB, b"\0"))
    add("raw-holding-qcow2", qraw, 1, fmt="raw")
    return imgs


def map_qemu(
    path: str, fmt: str, image_opts: str | None = None
) -> list[tuple[int, int, str, int | None]]:
    """``qemu-img map`` normalised: data -> ("data", depth); present but not data ->
    ("zero", depth); not present -> ("unallocated", None). Adjacent equal entries merged."""
    if image_opts:
        out = run(["qemu-img", "map", "--output=json", image_opts])
    else:
        out = run(["qemu-img", "map", "--output=json", "-f", fmt, path])
    norm = []
    for e in json.loads(out):
        if e["data"]:
            kind, depth = "data", e["depth"]
        elif e.get("present", True):
            kind, depth = "zero", e["depth"]
        else:
            kind, depth = "unallocated", None
        norm.append((e["start"], e["length"], kind, depth))
    return merge(norm)


def merge(
    entries: list[tuple[int, int, str, int | None]],
) -> list[tuple[int, int, str, int | None]]:
    out: list[tuple[int, int, str, int | None]] = []
    for start, length, kind, depth in entries:
        if out and out[-1][2:] == (kind, depth) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, kind, depth)
        else:
            out.append((start, length, kind, depth))
    return out


def write_qcow2(
    path: Path,
    *,
    size: int = MiB,
    cluster_bits: int = 9,
    backing: str | None = None,
    backing_fmt: str | None = "qcow2",
    l1_size: int | None = None,
    l1_offset: int | None = None,
    refcount_offset: int | None = None,
    nb_snapshots: int = 0,
    snapshots_offset: int = 0,
    incompatible: int = 0,
    crypt_method: int = 0,
    l1_entries: Sequence[int] = (),
    version: int = 3,
) -> None:
    """A minimal qcow2 written with struct: header cluster, L1 cluster(s), refcount table.

    Used for hostile images qemu-img will not create, and for very deep chains cheaply.
    """
    cs = 1 << cluster_bits
    per_l2 = cs // 8
    needed = -(-size // (per_l2 * cs))
    l1_size = needed if l1_size is None else l1_size
    l1_clusters = max(1, -(-min(l1_size, 4096) * 8 // cs))
    l1_offset = cs if l1_offset is None else l1_offset
    refcount_offset = cs * (1 + l1_clusters) if refcount_offset is None else refcount_offset
    rc_block = cs * (2 + l1_clusters)
    file_size = rc_block + cs
    hdr_len = 104 if version == 3 else 72
    exts = b""
    if backing_fmt is not None and backing is not None:
        fmtb = backing_fmt.encode()
        exts += struct.pack(">II", 0xE2792ACA, len(fmtb)) + fmtb.ljust((len(fmtb) + 7) & ~7, b"\0")
    exts += struct.pack(">II", 0, 0)
    name = backing.encode() if backing else b""
    boff = hdr_len + len(exts) if name else 0
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        boff,
        len(name),
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        refcount_offset,
        1,
        nb_snapshots,
        snapshots_offset,
    )
    if version == 3:
        hdr += struct.pack(">QQQII", incompatible, 0, 0, 4, hdr_len)
    buf = bytearray(file_size)
    blob = hdr + exts + name
    buf[: len(blob)] = blob
    if refcount_offset + 8 <= file_size:  # one refcount block: every cluster used once
        struct.pack_into(">Q", buf, refcount_offset, rc_block)
        for c in range(min(file_size // cs, cs // 2)):
            struct.pack_into(">H", buf, rc_block + 2 * c, 1)
    for i, e in enumerate(l1_entries):
        struct.pack_into(">Q", buf, cs + 8 * i, e)
    path.write_bytes(bytes(buf))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    """Built once per session; a second importer reuses the manifest."""
    root = tmp_path_factory.getbasetemp() / "qcow2-corpus"
    manifest = root / "manifest.json"
    if not manifest.exists():
        imgs = build_corpus(root / "imgs")
        manifest.write_text(json.dumps([asdict(i) for i in imgs]))
    return {e["name"]: Image(**e) for e in json.loads(manifest.read_text())}


IMAGE_NAMES = (
    "v2-64k",
    "v3-64k",
    "v3-512",
    "v3-2m",
    "zlib",
    "zstd",
    "zlib-2m",
    "zstd-4k",
    "extl2",
    "extl2-chain",
    "bitmaps",
    "chain64",
    "raw-base",
    "short-backing",
    "compressed-overlay",
    "raw-holding-qcow2",
)
