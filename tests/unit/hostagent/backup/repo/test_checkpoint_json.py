"""A manifest's checkpoint: the Cinder snapshot id the backup read at (issue 15).

Manifests an earlier qsnap wrote name only an overlay; they must still parse (snapshot id
None: never trusted for an incremental again). A snapshot id that is not a canonical
uuid is refused: the next backup looks it up in the ledger and deletes it by that id.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from hostagent.backup.repo import (
    Checkpoint,
    FormatError,
    Manifest,
    ManifestExtent,
    Repository,
    SourceLayer,
)

VOL = "0b1e5a1c-7d2f-4e3a-9c1b-2f4d6a8b0c11"
SID = "5f0c2a1e-8b3d-4c6f-9e2a-1b7d3c5e9f40"
OLD = {"overlay": f"volume-{VOL}.qsnap-bk-{SID}", "boundary": f"volume-{VOL}"}


def test_an_old_checkpoint_without_a_snapshot_id_parses_as_legacy() -> None:
    cp = Checkpoint.from_json(dict(OLD))
    assert cp == Checkpoint(OLD["overlay"], OLD["boundary"]) and cp.snapshot_id is None
    assert cp.to_json() == OLD  # written back as it was: no "snapshot_id": null
    assert Checkpoint.from_json(None) is None


def test_round_trip_keeps_the_snapshot_id() -> None:
    cp = Checkpoint(f"volume-{VOL}.{SID}", f"volume-{VOL}", SID)
    doc = json.loads(json.dumps(cp.to_json()))
    assert doc["snapshot_id"] == SID and Checkpoint.from_json(doc) == cp


@pytest.mark.parametrize(
    "sid", [42, "", "not-a-uuid", SID.upper(), f"{SID} ", f"../{SID}", ["x"], {"id": SID}]
)
def test_a_bad_snapshot_id_is_refused(sid: Any) -> None:
    with pytest.raises(FormatError, match="snapshot id"):
        Checkpoint.from_json({**OLD, "snapshot_id": sid})


def test_bad_documents_are_refused() -> None:
    for doc in ("x", [OLD], {"boundary": OLD["boundary"]}, {**OLD, "overlay": "../etc"}):
        with pytest.raises(FormatError):
            Checkpoint.from_json(doc)


@pytest.mark.parametrize("sid", [SID, None])
def test_published_manifest_headers_keep_the_checkpoint(tmp_path: Path, sid: str | None) -> None:
    """What the next backup reads (the headers, not the whole manifest) keeps the id."""
    repo = Repository.create(tmp_path / "repo")
    cp = Checkpoint(f"volume-{VOL}.{sid or SID}", f"volume-{VOL}", sid)
    m = Manifest(
        backup_id=str(uuid.uuid4()),
        volume_id=VOL,
        virtual_size=1 << 20,
        created_at="2026-01-02T03:04:05Z",
        parent_id=None,
        kind="full",
        source_chain=(SourceLayer(f"volume-{VOL}", "qcow2"),),
        read_bytes=0,
        extents=(ManifestExtent(0, 1 << 20, "zero"),),
        checkpoint=cp,
    )
    repo.publish(m)
    (h,) = Repository.open(repo.path).headers(VOL)
    assert h.checkpoint == cp and repo.load(VOL, m.backup_id).checkpoint == cp
