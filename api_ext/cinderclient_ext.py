"""python-cinderclient extension for qsnap's Cinder API extension (api_ext.cinder_extension).

Use: ``Client(..., extensions=[Extension("qsnap_snapshots", cinderclient_ext)])``, then
``client.qsnap_snapshots.create_metadata(...)``. cinderclient binds the module's last
``base.Manager`` subclass, so this module defines exactly one.
"""

from __future__ import annotations

from typing import Any

from cinderclient import base
from cinderclient.v3.volume_snapshots import Snapshot

CREATE = "create-snapshot-metadata"
FINALIZE = "finalize-snapshot-metadata"
DELETE = "snapshot-delete-metadata"


def create_body(
    volume_id: str,
    name: str | None = None,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Only set fields travel: the server rejects unknown ones and treats absent as unset."""
    args: dict[str, Any] = {"volume_id": volume_id}
    if name is not None:
        args["name"] = name
    if description is not None:
        args["description"] = description
    if metadata is not None:
        args["metadata"] = dict(metadata)
    return {CREATE: args}


def finalize_body(status: str = "available", progress: str | None = None) -> dict[str, Any]:
    if status not in ("available", "error", "creating"):
        raise ValueError(f"status must be available, error or creating, not {status!r}")
    args: dict[str, Any] = {"status": status}
    if progress is not None:
        args["progress"] = progress
    return {FINALIZE: args}


def delete_body() -> dict[str, Any]:
    return {DELETE: {}}


class QsnapSnapshotManager(base.Manager):  # type: ignore[misc]  # cinderclient is untyped
    """Records for agent-taken snapshots; the agent picks each snapshot's uuid itself."""

    resource_class = Snapshot

    def _post(self, snapshot: Any, body: dict[str, Any]) -> Any:
        url = f"/snapshots/{base.getid(snapshot)}/action"
        resp, data = self.api.client.post(url, body=body)
        return resp, data

    def create_metadata(
        self,
        snapshot_id: str,
        volume_id: str,
        name: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Snapshot:
        """Record snapshot ``snapshot_id`` of ``volume_id`` in ``creating``; no driver call."""
        resp, data = self._post(snapshot_id, create_body(volume_id, name, description, metadata))
        return Snapshot(self, data["snapshot"], loaded=True, resp=resp)

    def finalize(
        self, snapshot: Any, status: str = "available", progress: str | None = None
    ) -> Snapshot:
        """``creating`` -> ``status`` (``available`` gets progress 100% unless given)."""
        resp, data = self._post(snapshot, finalize_body(status, progress))
        return Snapshot(self, data["snapshot"], loaded=True, resp=resp)

    def delete_metadata(self, snapshot: Any) -> None:
        """Drop Cinder's record only; the snapshot's file is the caller's business."""
        self._post(snapshot, delete_body())
