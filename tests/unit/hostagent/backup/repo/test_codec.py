"""Chunk frames: incompressible chunks stored as raw-block zstd frames any decoder reads."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import zstandard

from hostagent.backup.repo import CorruptChunk, Repository, backup_full, restore
from hostagent.backup.repo.codec import RAW_BLOCK, raw_frame, worth_compressing
from tests.unit.hostagent.backup.helpers import VOL, MiB, file_sha, guest_sha, make_base

PROBE = zstandard.ZstdCompressor(level=1)


@pytest.mark.parametrize("n", [1, 4096, RAW_BLOCK, RAW_BLOCK + 1, 3 * RAW_BLOCK + 5, 4 * MiB])
def test_raw_frame_is_a_standard_zstd_frame(n: int, tmp_path: Path) -> None:
    data = os.urandom(n)
    frame = b"".join(bytes(p) for p in raw_frame(data))
    assert len(frame) == n + 9 + 3 * (-(-n // RAW_BLOCK))
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    f = tmp_path / "c.zst"
    f.write_bytes(frame)
    out = subprocess.run(["zstd", "-dc", str(f)], check=True, capture_output=True).stdout
    assert out == data


def test_only_uniformly_incompressible_data_skips_compression() -> None:
    rnd = random.Random(3)
    noise = rnd.randbytes(4 * MiB)
    assert not worth_compressing(noise, PROBE)
    assert worth_compressing(b"abc " * MiB, PROBE)
    # one compressible region among noise is enough to compress the chunk
    mixed = noise[: 3 * MiB] + bytes(MiB)
    assert worth_compressing(mixed, PROBE)
    assert not worth_compressing(noise[:1000], PROBE)
    assert worth_compressing(bytes(1000), PROBE)


def test_random_chunks_are_stored_raw_and_restore_exactly(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=16 * MiB, every=3)
    repo = Repository.create(tmp_path / "repo")
    res = backup_full(base, "qcow2", [share], repo, VOL)
    raw_frames = compressed = 0
    for cid in res.manifest.chunk_ids():
        size = os.path.getsize(repo.chunk_path(cid))
        if size > MiB:
            raw_frames += 1
            assert size == MiB + 9 + 3 * (MiB // RAW_BLOCK)
        else:
            compressed += 1
            assert size < MiB // 10
    assert raw_frames == 3 and compressed == 3  # MiB 0, 6, 12 random; 3, 9, 15 text
    out = tmp_path / "out.raw"
    restore(repo, res.manifest.backup_id, out)
    assert file_sha(out) == guest_sha(base, tmp_path)


@pytest.mark.parametrize("where", ["header", "data", "truncated"])
def test_damaged_raw_frame_fails_restore_naming_the_chunk(tmp_path: Path, where: str) -> None:
    share = tmp_path / "share"
    share.mkdir()
    base = make_base(share, size=8 * MiB, every=3)  # MiB 0 and 6 random, 3 text
    repo = Repository.create(tmp_path / "repo")
    res = backup_full(base, "qcow2", [share], repo, VOL)
    raw = [c for c in res.manifest.chunk_ids() if os.path.getsize(repo.chunk_path(c)) > MiB]
    cid = raw[0]
    p = Path(repo.chunk_path(cid))
    data = bytearray(p.read_bytes())
    if where == "header":
        data[7] ^= 0x01  # content size field
    elif where == "data":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-100:]
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptChunk) as ei:
        restore(repo, res.manifest.backup_id, tmp_path / "out.raw")
    assert ei.value.chunk_id == cid
    assert not (tmp_path / "out.raw").exists()
    with pytest.raises(CorruptChunk):
        repo.verify(res.manifest)
