"""Fuzz the qcow2 header and table parsing: only Qcow2Error may escape, nothing may hang.

Inputs are mutated real headers (qemu-img made templates: v2, v3, zlib, zstd, extended L2),
random bytes behind a qcow2 magic, and real images with random L1/L2 entries. Every input
is inspected, then fully exercised: allocation maps, layer map and reads of every extent
(bounded by the file size, which bounds every table).

Longer run (the unit suite runs 200 examples per target)::

    .venv/bin/python tests/fuzz/fuzz_qcow2.py --examples 20000
    .venv/bin/python tests/fuzz/fuzz_qcow2.py --atheris -- -max_total_time=3600  # if installed
"""

from __future__ import annotations

import argparse
import itertools
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qcow2 import Qcow2Error, open_chain

NAME = "volume-00000000-0000-4000-8000-000000000001"
_TEMPLATES: dict[str, bytes] = {}


def templates() -> dict[str, bytes]:
    """Small real images, built once per process with qemu-img/qemu-io."""
    if _TEMPLATES:
        return _TEMPLATES
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "src.raw")
        src.write_bytes((os.urandom(6000) + b"text " * 3000) * 20)
        variants = {
            "v3": ["-o", "cluster_size=4k"],
            "v2": ["-o", "compat=0.10,cluster_size=4k"],
            "zlib": ["-c", "-o", "cluster_size=4k"],
            "zstd": ["-c", "-o", "compression_type=zstd,cluster_size=4k"],
            "extl2": ["-o", "extended_l2=on,cluster_size=16k"],
        }
        for key, opts in variants.items():
            out = Path(d, key)
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(src), str(out)],
                check=True,
            )
            if key == "extl2":
                subprocess.run(
                    [
                        "qemu-io",
                        "-f",
                        "qcow2",
                        "-c",
                        "write -z 2k 1k",
                        "-c",
                        "discard 40k 4k",
                        str(out),
                    ],
                    check=True,
                    capture_output=True,
                )
            _TEMPLATES[key] = out.read_bytes()
    return _TEMPLATES


def exercise(data: bytes, workdir: str | None = None) -> None:
    """Inspect and read ``data`` as a qcow2 top file; swallow only our own errors."""
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = Path(d, NAME)
        path.write_bytes(data)
        try:
            with open_chain(path, roots=[d]) as chain:
                for e in itertools.islice(chain.extents(), 512):
                    chain.read(e.offset, min(e.length, 65536))
                    if e.length > 65536:
                        chain.read(e.offset + e.length - 4096, 4096)
                list(itertools.islice(chain.layer_extents(0), 512))
                chain.read(max(0, chain.virtual_size - 100), 100)
        except Qcow2Error:
            pass


def _l1_l2(img: bytes) -> tuple[int, int, int]:
    """(cluster size, L1 offset, first L2 offset) of a template."""
    cb = struct.unpack_from(">I", img, 20)[0]
    l1_off = struct.unpack_from(">Q", img, 40)[0]
    l2 = struct.unpack_from(">Q", img, l1_off)[0] & 0x00FFFFFFFFFFFE00
    return 1 << cb, l1_off, l2


template_key = st.sampled_from(["v3", "v2", "zlib", "zstd", "extl2"])
mutations = st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12)
u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 1 << 20).map(lambda x: x | (1 << 63)),
    st.integers(0, 2**62).map(lambda x: x | (1 << 62)),
    st.integers(0, 64).map(lambda x: x * 4096 | (1 << 63)),
)


@given(key=template_key, muts=mutations)
def fuzz_mutated_header(key: str, muts: list[tuple[int, int]]) -> None:
    img = bytearray(templates()[key])
    for pos, val in muts:
        if pos < len(img):
            img[pos] = val
    exercise(bytes(img))


@given(version=st.sampled_from([2, 3]), body=st.binary(max_size=8192))
def fuzz_random_after_magic(version: int, body: bytes) -> None:
    exercise(b"QFI\xfb" + struct.pack(">I", version) + body)


@given(
    key=template_key,
    l1=st.lists(st.tuples(st.integers(0, 7), u64), max_size=4),
    l2=st.lists(st.tuples(st.integers(0, 1023), u64), max_size=24),
)
def fuzz_random_tables(key: str, l1: list[tuple[int, int]], l2: list[tuple[int, int]]) -> None:
    img = bytearray(templates()[key])
    cs, l1_off, l2_off = _l1_l2(bytes(img))
    for i, val in l1:
        struct.pack_into(">Q", img, l1_off + 8 * i, val)
    if l2_off and l2_off + cs <= len(img):
        for i, val in l2:
            struct.pack_into(">Q", img, l2_off + (8 * i) % cs, val)
    exercise(bytes(img))


TARGETS = (fuzz_mutated_header, fuzz_random_after_magic, fuzz_random_tables)


def _atheris(argv: list[str]) -> None:
    import atheris  # type: ignore[import-not-found]

    def one(data: bytes) -> None:
        exercise(data)

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--atheris", action="store_true")
    ap.add_argument("rest", nargs="*")
    args = ap.parse_args()
    if args.atheris:
        _atheris(args.rest)
        return
    for target in TARGETS:
        print(f"{target.__name__}: {args.examples} examples", flush=True)
        settings(
            max_examples=args.examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(target)()
    print("ok: no exception other than Qcow2Error")


if __name__ == "__main__":
    main()
