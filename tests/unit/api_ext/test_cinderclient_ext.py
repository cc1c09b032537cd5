"""The cinderclient extension: the wire bodies it posts, and how cinderclient binds it."""

from __future__ import annotations

from typing import Any

import pytest
from cinderclient import api_versions
from cinderclient import client as cclient
from cinderclient.extension import Extension

from api_ext import cinderclient_ext
from api_ext.cinderclient_ext import QsnapSnapshotManager

SID = "6f1c2a4e-1b2c-4d3e-8f90-123456789abc"
VID = "0b9e7c5d-aaaa-4bbb-8ccc-0123456789ab"


class _Recorder:
    """Stands in for cinderclient's HTTP client: records posts, answers like the extension."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []

    def post(self, url: str, body: Any) -> tuple[object, Any]:
        self.posts.append((url, body))
        return object(), {"snapshot": {"id": SID, "volume_id": VID, "status": "creating"}}


class _Api:
    def __init__(self) -> None:
        self.client = _Recorder()
        self.api_version = api_versions.APIVersion("3.44")


def test_create_sends_only_given_fields() -> None:
    api = _Api()
    snap = QsnapSnapshotManager(api).create_metadata(SID, VID, name="n", metadata={"k": "v"})
    assert api.client.posts == [
        (
            f"/snapshots/{SID}/action",
            {"create-snapshot-metadata": {"volume_id": VID, "name": "n", "metadata": {"k": "v"}}},
        )
    ]
    assert (snap.id, snap.volume_id, snap.status) == (SID, VID, "creating")


def test_finalize_and_delete_bodies() -> None:
    api = _Api()
    mgr = QsnapSnapshotManager(api)
    mgr.finalize(SID)
    mgr.finalize(SID, "creating", progress="40%")
    mgr.delete_metadata(SID)
    assert [b for _, b in api.client.posts] == [
        {"finalize-snapshot-metadata": {"status": "available"}},
        {"finalize-snapshot-metadata": {"status": "creating", "progress": "40%"}},
        {"snapshot-delete-metadata": {}},
    ]
    assert {u for u, _ in api.client.posts} == {f"/snapshots/{SID}/action"}


def test_finalize_refuses_unknown_status_before_sending() -> None:
    api = _Api()
    with pytest.raises(ValueError, match="status"):
        QsnapSnapshotManager(api).finalize(SID, "deleted")
    assert api.client.posts == []


def test_cinderclient_binds_the_manager_by_extension_name() -> None:
    ext = Extension("qsnap_snapshots", cinderclient_ext)
    assert ext.manager_class is QsnapSnapshotManager
    c = cclient.Client(
        api_versions.APIVersion("3.44"),
        "u",
        "p",
        "proj",
        "http://127.0.0.1:9/v3",
        extensions=[ext],
    )
    assert isinstance(c.qsnap_snapshots, QsnapSnapshotManager)
