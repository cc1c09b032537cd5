"""Image builders shared by the backup tests: real qemu-img/qemu-io, Cinder file names."""

from __future__ import annotations

import hashlib
import random
import subprocess
import uuid
from pathlib import Path

import zstandard

from hostagent.backup.repo import Manifest, ManifestExtent, Repository, SourceLayer

MiB = 1 << 20
VOL = "0b1e5a1c-7d2f-4e3a-9c1b-2f4d6a8b0c11"


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def block(rnd: random.Random, i: int) -> bytes:
    """1 MiB: random for even i, text for odd i (both kinds of compressibility)."""
    if i % 2 == 0:
        return rnd.randbytes(MiB)
    line = f"line {i}: the quick brown fox jumps over the lazy qcow2 dog {rnd.random()}\n"
    return (line.encode() * (MiB // len(line) + 1))[:MiB]


def make_base(d: Path, size: int = 64 * MiB, seed: int = 1, every: int = 3) -> Path:
    """``volume-<VOL>`` qcow2: 1 MiB data extents every ``every`` MiB, holes between."""
    rnd = random.Random(seed)
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(0, size // MiB, every):
            f.seek(i * MiB)
            f.write(block(rnd, i))
    base = d / f"volume-{VOL}"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    raw.unlink()
    return base


def make_overlay(below: Path, tag: str) -> Path:
    ov = below.parent / f"volume-{VOL}.{uuid.uuid5(uuid.NAMESPACE_OID, tag)}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", below.name, "-F", "qcow2", str(ov))
    return ov


def write_random(img: Path, offset: int, length: int, seed: int) -> None:
    src = img.parent / f".src-{seed}"
    src.write_bytes(random.Random(seed).randbytes(length))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {src} {offset} {length}", str(img))
    src.unlink()


def write_zero(img: Path, offset: int, length: int) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -z {offset} {length}", str(img))


def guest_sha(img: Path, work: Path, fmt: str = "qcow2") -> str:
    """sha256 of the guest view as qemu-img itself converts it to raw."""
    out = work / f".ref-{uuid.uuid4()}.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(out))
    h = file_sha(out)
    out.unlink()
    return h


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def publish_backup(repo: Repository, vol: str, when: str, payload: bytes) -> Manifest:
    """Publish a one-chunk backup made at ``when`` (ISO, UTC) holding ``payload``."""
    cid = hashlib.sha256(payload).hexdigest()
    repo.put_chunk(cid, zstandard.ZstdCompressor().compress(payload))
    m = Manifest(
        backup_id=str(uuid.uuid4()),
        volume_id=vol,
        virtual_size=len(payload),
        created_at=when,
        parent_id=None,
        kind="full",
        source_chain=(SourceLayer(f"volume-{vol}", "qcow2"),),
        read_bytes=len(payload),
        extents=(ManifestExtent(0, len(payload), "data", cid, 0),),
    )
    repo.publish(m)
    return m
