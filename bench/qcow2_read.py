"""Reader throughput vs qemu-img, and a 64-layer chain vs a 1-layer image, in one run.

Builds a qcow2 image (default 4 GiB virtual, half allocated in 1 MiB extents with 1 MiB
holes, data half random half text), 63 overlays above it (1 MiB written in each) and the
same content flattened into one image. Prints ratios (targets >= 0.8x):

- reader (read every data extent, skip unallocated/zero) vs ``qemu-img convert -O raw`` to
  a sparse file, and vs ``qemu-img convert`` into ``null-co`` (no write cost at all);
- reading the 64-layer chain vs reading the flattened 1-layer image with the same content.

Everything runs from the page cache (files just written); each figure is the median of
``--repeat`` runs, taken alternately. Usage::

    .venv/bin/python bench/qcow2_read.py [--dir /var/tmp/qsnap-bench] [--size 4G] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcow2 import ExtentKind, open_chain

MiB = 1 << 20
CHUNK = 8 * MiB


def _vol(tag: str) -> str:
    return f"volume-{uuid.uuid5(uuid.NAMESPACE_OID, 'qsnap-bench-' + tag)}"


def _run(*argv: str, cwd: Path | None = None) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def build(d: Path, size: int) -> tuple[Path, Path, Path]:
    """(1-layer image, 64-layer chain top, flattened chain) under ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)
    blocks = [rnd.randbytes(MiB) for _ in range(8)]
    text = (b"Lorem ipsum dolor sit amet, qcow2 benchmark text line %d.\n" * 20000)[:MiB]
    blocks += [text.replace(b"%d", str(i).encode().ljust(2)) for i in range(8)]
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(0, size // MiB, 2):
            f.seek(i * MiB)
            f.write(blocks[i % len(blocks)])
    base = d / _vol("base")
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    top = base
    for i in range(1, 64):
        ov = d / f"{base.name}.{uuid.uuid5(uuid.NAMESPACE_OID, f'ov{i}')}"
        _run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            top.name,
            "-F",
            "qcow2",
            ov.name,
            str(size),
            cwd=d,
        )
        off = (i * 37 % (size // MiB)) * MiB
        _run("qemu-io", "-f", "qcow2", "-c", f"write -P {i} {off} 1M", str(ov))
        top = ov
    flat = d / _vol("flat")
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(top), str(flat))
    return base, top, flat


def read_all(path: Path, root: Path) -> int:
    """Read every DATA extent of the chain under ``path``; returns bytes read."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with open_chain(path, roots=[root]) as chain:
        for e in chain.extents():
            if e.kind is not ExtentKind.DATA:
                continue
            pos, end = e.offset, e.offset + e.length
            while pos < end:
                n = chain.readinto(pos, view[: min(CHUNK, end - pos)])
                total += n
                pos += n
    return total


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/qsnap-bench-qcow2"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the images")
    args = ap.parse_args()
    size = _size(args.size)
    d: Path = args.dir
    t0 = time.perf_counter()
    base, top, flat = build(d, size) if not (d / _vol("flat")).exists() else _existing(d)
    print(f"images ready in {time.perf_counter() - t0:.1f} s under {d}")
    out = d / "convert-out.raw"

    def convert() -> None:
        _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(base), str(out))

    def convert_null() -> None:
        _run(
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "qcow2",
            str(base),
            "--target-image-opts",
            f"driver=null-co,size={size}",
        )

    results: dict[str, list[float]] = {
        k: [] for k in ("reader", "convert", "null", "chain", "flat")
    }
    nbytes = 0
    for _ in range(args.repeat):
        nbytes = 0

        def reader() -> None:
            nonlocal nbytes
            nbytes = read_all(base, d)

        results["reader"].append(timed(reader))
        results["convert"].append(timed(convert))
        out.unlink()
        results["null"].append(timed(convert_null))
        results["chain"].append(timed(lambda: read_all(top, d)))
        results["flat"].append(timed(lambda: read_all(flat, d)))
    med = {k: statistics.median(v) for k, v in results.items()}
    gib = nbytes / (1 << 30)
    print(f"data read by the reader: {nbytes / MiB:.0f} MiB of {size / MiB:.0f} MiB virtual")
    for k in ("reader", "convert", "null", "chain", "flat"):
        print(f"  {k:8s} median {med[k]:6.2f} s  ({gib / med[k]:.2f} GiB/s of data)")
    print(
        f"reader vs qemu-img convert -O raw (sparse file): {med['convert'] / med['reader']:.2f}x"
        "  (target >= 0.8x)"
    )
    print(f"reader vs qemu-img convert to null-co:           {med['null'] / med['reader']:.2f}x")
    print(
        f"64-layer chain vs 1-layer image:                 {med['flat'] / med['chain']:.2f}x"
        "  (target >= 0.8x)"
    )
    if not args.keep:
        shutil.rmtree(d)


def _existing(d: Path) -> tuple[Path, Path, Path]:
    base = d / _vol("base")
    tops = sorted(p for p in d.iterdir() if p.name.startswith(base.name + "."))
    chain_top = base
    for i in range(1, 64):  # recompute the top's name deterministically
        chain_top = d / f"{base.name}.{uuid.uuid5(uuid.NAMESPACE_OID, f'ov{i}')}"
    assert chain_top in tops
    return base, chain_top, d / _vol("flat")


if __name__ == "__main__":
    os.umask(0o022)
    main()
