"""Manifests read piecemeal (headers for listings, streamed extents for GC) read exactly
what a whole load reads, and refuse what a whole load refuses."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest

from hostagent.backup.repo import (
    FormatError,
    Manifest,
    ManifestExtent,
    RepoConfig,
    Repository,
    SourceLayer,
)
from hostagent.backup.repo import manifest_stream as ms

VOL = str(uuid.uuid4())
CHUNK = "ab" * 32


def _manifest(n: int = 5000, reason: str | None = None) -> Manifest:
    """``n`` extents alternating data (chunk ids varying) and zeros: bigger than one block."""
    extents = []
    for i in range(n):
        if i % 2:
            extents.append(ManifestExtent(i * 4096, 4096, "zero"))
        else:
            cid = f"{i % 251:02x}".ljust(64, "c")
            extents.append(ManifestExtent(i * 4096, 4096, "data", cid, 0))
    return Manifest(
        backup_id=str(uuid.uuid4()), volume_id=VOL, virtual_size=n * 4096,
        created_at="2026-12-05T10:00:00.000000Z", parent_id=None, kind="full",
        source_chain=(SourceLayer(f"volume-{VOL}", "raw"),), read_bytes=123,
        extents=tuple(extents), fallback_reason=reason,
    )  # fmt: skip


def test_header_and_streamed_extents_equal_a_whole_load() -> None:
    # a reason quoting the marker itself: escaped inside a string, never found there
    m = _manifest(reason='odd "extents":[ text')
    raw = m.dumps()
    assert len(raw) > 4 * (1 << 16)
    h = ms.read_header(io.BytesIO(raw))
    assert (h.backup_id, h.kind, h.virtual_size, h.fallback_reason) == (
        m.backup_id,
        "full",
        m.virtual_size,
        m.fallback_reason,
    )
    assert h.data_bytes == m.data_bytes() and h.chunks == len(m.chunk_ids())
    assert tuple(ms.iter_extents(io.BytesIO(raw), m.virtual_size)) == m.extents
    assert set(ms.chunk_ids(io.BytesIO(raw), m.virtual_size)) == m.chunk_ids()


def test_an_older_manifest_without_header_figures_and_another_layout_still_read() -> None:
    m = _manifest(40)
    doc = m.to_json()
    del doc["data_bytes"], doc["chunks"]
    older = json.dumps(doc, separators=(",", ":")).encode()
    h = ms.read_header(io.BytesIO(older))
    assert h.data_bytes is None and h.chunks is None and h.backup_id == m.backup_id
    # extents not last (hand-made): the whole-load fallback, same answers
    moved = {"extents": doc.pop("extents"), **doc}
    raw = json.dumps(moved, indent=2).encode()
    assert ms.read_header(io.BytesIO(raw)).chunks == len(m.chunk_ids())
    assert tuple(ms.iter_extents(io.BytesIO(raw), m.virtual_size)) == m.extents


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda r: r[: len(r) // 2], "ends inside"),  # truncated
        (lambda r: r[:-1] + b',"x":1}', "after the extents"),
        (lambda r: r.replace(b"[[0,4096,", b"[[8192,4096,", 1), "overlaps"),
        (lambda r: r.replace(b',"zero"]', b',"zero"],,', 1), "manifest"),
    ],
)
def test_damaged_manifests_are_refused_while_streaming(edit: object, why: str) -> None:
    m = _manifest(300)
    raw = edit(m.dumps())  # type: ignore[operator]
    with pytest.raises(FormatError, match=why):
        list(ms.iter_extents(io.BytesIO(raw), m.virtual_size))


def test_repository_lists_headers_and_gc_streams(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", RepoConfig(chunk_size=1 << 20, zstd_level=1))
    kept = [_manifest(100), _manifest(60)]
    for m in kept:
        repo.publish(m)
    hs = repo.headers(VOL)
    assert [h.backup_id for h in hs] == sorted(m.backup_id for m in kept)  # same created_at
    assert {h.backup_id: h.chunks for h in hs} == {m.backup_id: len(m.chunk_ids()) for m in kept}
    streamed = set(repo.chunk_ids_of(hs[0]))
    assert streamed == next(m for m in kept if m.backup_id == hs[0].backup_id).chunk_ids()
