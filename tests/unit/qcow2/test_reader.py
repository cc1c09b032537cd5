"""The reader against QEMU itself: bytes vs ``qemu-img convert``, maps vs ``qemu-img map``.

Map comparison: both sides are normalised to (start, length, kind, depth) and adjacent equal
entries merged. QEMU's ``data: true`` is DATA; ``present: true, data: false`` is ZERO (a zero
cluster, or a hole in a raw bottom layer); ``present: false`` is UNALLOCATED with no depth
(QEMU prints ``zero: true`` and the bottom's depth, or depth 0 past a shorter backing file,
for such ranges; the depth is meaningless there, so it is not compared).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

from qcow2 import Chain, CorruptImage, ExtentKind, UnsafeImage, open_chain
from tests.unit.qcow2.corpus import IMAGE_NAMES, Image, corpus, map_qemu, merge, run

__all__ = ["corpus"]

MiB = 1024 * 1024


def _open(img: Image) -> Chain:
    return open_chain(img.path, roots=[str(Path(img.path).parent)], fmt=img.fmt)


def _reference(img: Image, tmp_path: Path) -> bytes:
    out = tmp_path / "ref.raw"
    run(["qemu-img", "convert", "-f", img.fmt, "-O", "raw", img.path, str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_read_matches_qemu_img_convert(corpus: dict[str, Image], name: str, tmp_path: Path) -> None:
    img = corpus[name]
    ref = _reference(img, tmp_path)
    with _open(img) as chain:
        assert len(chain.layers) == img.layers
        assert chain.virtual_size == len(ref)
        h = hashlib.sha256()
        buf = bytearray(3 * MiB // 2 + 512)  # odd size: reads straddle clusters
        pos = 0
        while pos < chain.virtual_size:
            n = chain.readinto(pos, memoryview(buf))
            h.update(buf[:n])
            pos += n
        assert h.hexdigest() == hashlib.sha256(ref).hexdigest()
        rnd = random.Random(name)
        for _ in range(40):
            off = rnd.randrange(chain.virtual_size)
            length = rnd.choice((1, 511, 4097, 70000, 300000))
            assert chain.read(off, length) == ref[off : off + length]


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_extents_match_qemu_img_map(corpus: dict[str, Image], name: str) -> None:
    img = corpus[name]
    with _open(img) as chain:
        ours = merge([(e.offset, e.length, e.kind.value, e.depth) for e in chain.extents()])
    assert ours == map_qemu(img.path, img.fmt)


@pytest.mark.parametrize("name", ["extl2-chain", "chain64", "raw-base", "compressed-overlay"])
def test_layer_extents_match_qemu_map_of_the_layer_alone(
    corpus: dict[str, Image], name: str
) -> None:
    """Each layer opened alone (backing=null) must map exactly like ``layer_extents``."""
    img = corpus[name]
    with _open(img) as chain:
        for depth, info in enumerate(chain.layers):
            if depth % 7 and depth != len(chain.layers) - 1 and depth > 2:
                continue  # a sample of the 64 layers keeps this fast
            ours = merge(
                [
                    (e.offset, e.length, e.kind.value, e.depth and 0)
                    for e in chain.layer_extents(depth)
                ]
            )
            spec: dict[str, object] = {
                "driver": info.fmt,
                "file": {"driver": "file", "filename": info.path},
            }
            if info.fmt == "qcow2":
                spec["backing"] = None
            opts = "json:" + json.dumps(spec)
            assert ours == map_qemu(info.path, info.fmt, image_opts=opts), (depth, info.path)


def test_layer_extents_report_only_what_the_layer_wrote(corpus: dict[str, Image]) -> None:
    """Incremental backup relies on this. Layer 60 of chain64 (depth 3, 512 B clusters)
    zeroed 70 KiB at 2820 KiB and wrote 9 KiB at 3660 KiB; nothing else."""
    with _open(corpus["chain64"]) as chain:
        assert chain.layers[3].cluster_size == 512
        got = [
            (e.offset, e.length, e.kind, e.depth)
            for e in chain.layer_extents(3)
            if e.kind is not ExtentKind.UNALLOCATED
        ]
        assert got == [
            (2820 * 1024, 70 * 1024, ExtentKind.ZERO, 3),
            (3660 * 1024, 9 * 1024, ExtentKind.DATA, 3),
        ]


def test_extents_subrange_and_bounds(corpus: dict[str, Image]) -> None:
    with _open(corpus["extl2-chain"]) as chain:
        sub = list(chain.extents(4096, 6144))
        assert [(e.offset, e.length, e.kind, e.depth) for e in sub] == [
            (4096, 6144, ExtentKind.DATA, 0)
        ]
        assert chain.read(chain.virtual_size - 10, 100) == chain.read(chain.virtual_size - 10, 10)
        assert len(chain.read(chain.virtual_size - 10, 100)) == 10
        with pytest.raises(ValueError):
            chain.read(chain.virtual_size + 1, 1)
        with pytest.raises(ValueError):
            chain.read(-1, 1)


def test_raw_holding_qcow2_header_reads_as_raw(corpus: dict[str, Image]) -> None:
    img = corpus["raw-holding-qcow2"]
    data = Path(img.path).read_bytes()
    assert data[:4] == b"QFI\xfb"
    with _open(img) as chain:
        assert chain.layers[0].fmt == "raw" and chain.layers[0].backing_name is None
        assert chain.read(0, len(data)) == data


def _copy(img: Image, tmp_path: Path) -> Path:
    dst = tmp_path / Path(img.path).name
    dst.write_bytes(Path(img.path).read_bytes())
    return dst


def _first_l2(path: Path) -> tuple[int, int]:
    """(cluster size, offset of the first L2 table) of a single-layer image."""
    head = path.read_bytes()[:48]
    cb = struct.unpack(">I", head[20:24])[0]
    l1_off = struct.unpack(">Q", head[40:48])[0]
    with open(path, "rb") as f:
        f.seek(l1_off)
        l1e = struct.unpack(">Q", f.read(8))[0]
    return 1 << cb, l1e & 0x00FFFFFFFFFFFE00


def test_unaligned_data_cluster_is_corrupt_image(corpus: dict[str, Image], tmp_path: Path) -> None:
    p = _copy(corpus["v3-64k"], tmp_path)
    _cs, l2 = _first_l2(p)
    with open(p, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | 0x10200))
    with open_chain(p, roots=[tmp_path]) as chain, pytest.raises(CorruptImage) as ei:
        chain.read(0, 4096)
    assert str(p) in str(ei.value) and "0x10200" in str(ei.value)


def test_garbage_compressed_cluster_is_corrupt_image(
    corpus: dict[str, Image], tmp_path: Path
) -> None:
    p = _copy(corpus["zlib"], tmp_path)
    with open_chain(p, roots=[tmp_path]) as chain:
        first = next(e for e in chain.extents() if e.kind is ExtentKind.DATA)
    _cs, l2 = _first_l2(p)
    with open(p, "r+b") as f:
        f.seek(l2 + 8 * (first.offset // 65536))
        entry = struct.unpack(">Q", f.read(8))[0]
        host = entry & ((1 << 54) - 1)
        f.seek(host)
        f.write(b"\xff" * 64)
    with open_chain(p, roots=[tmp_path]) as chain, pytest.raises(CorruptImage) as ei:
        chain.read(first.offset, 1)
    assert "compressed cluster" in str(ei.value)


def test_replaced_file_after_inspection_is_refused(
    corpus: dict[str, Image], tmp_path: Path
) -> None:
    p = _copy(corpus["v3-64k"], tmp_path)
    chain = open_chain(p, roots=[tmp_path])
    (tmp_path / "x").mkdir()
    other = _copy(corpus["v2-64k"], tmp_path / "x")
    other.replace(p)  # a different inode now sits under the inspected name
    with chain, pytest.raises(UnsafeImage) as ei:
        chain.read(0, 1)
    assert ei.value.rule == "changed"


def test_qemu_img_refuses_nothing_we_read(corpus: dict[str, Image]) -> None:
    """Sanity of the corpus itself: QEMU's own checker finds every qcow2 image clean."""
    for img in corpus.values():
        if img.fmt == "qcow2":
            res = subprocess.run(
                ["qemu-img", "check", "-f", "qcow2", img.path],
                capture_output=True,
                text=True,
                check=False,
            )
            assert res.returncode == 0, (img.name, res.stdout, res.stderr)


def test_preallocated_clusters_never_written_map_as_zero(tmp_path: Path) -> None:
    """Cinder's qcow2 volumes are made with ``preallocation=metadata``: every cluster is
    allocated, none written, the file sparse. The map calls only the written MiB DATA (QEMU:
    ``data`` and ``zero`` both true elsewhere: it reads zeros there), so a full backup reads
    1 MiB, not the virtual size. Control: the raw cluster walk (no host holes) calls it all
    DATA, and the bytes still equal ``qemu-img convert``'s."""
    path = tmp_path / "volume-6d7c0a52-1c1b-4a7e-9d43-7f0c6f0e2a11"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
         str(path), "64M"])  # fmt: skip
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 1M", str(path)])
    with open_chain(str(path), roots=[str(tmp_path)], fmt="qcow2") as chain:
        ours = [(e.offset, e.length, e.kind) for e in chain.extents()]
        walk = list(chain._readers[0].runs(0, 64 * MiB))  # the control: no host holes
        data = chain.read(0, 64 * MiB)
    assert ours == [
        (0, 4 * MiB, ExtentKind.ZERO),
        (4 * MiB, MiB, ExtentKind.DATA),
        (5 * MiB, 59 * MiB, ExtentKind.ZERO),
    ]
    qemu = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)]))
    assert all(e["data"] and e["zero"] != (4 * MiB <= e["start"] < 5 * MiB) for e in qemu)
    assert sum(n for _, n, kind, _ in walk if kind == 0) == 64 * MiB  # K_DATA, every cluster
    out = tmp_path / "ref.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)])
    assert data == out.read_bytes()
