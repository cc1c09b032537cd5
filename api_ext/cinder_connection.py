"""Cinder's view of a volume's active file, kept as its NFS/remotefs driver keeps it.

Cinder's own online snapshot (``remotefs._create_snapshot``) rewrites, besides ``.info``, the
attachment's ``connection_info`` (``name``, ``format``) and the volume's admin metadata
``format`` (saving ``base_format`` on the first snapshot); Nova copies the attachment into its
block-device mapping, and ``os-initialize_connection`` reads the image with the admin
metadata's format. Snapshots the agent takes or deletes by itself reach Cinder only through
this extension, so its create/finalize/delete-metadata actions do the same here:

- create-snapshot-metadata: ``base_format`` := ``format`` when the volume has no snapshot yet;
- finalize ``available`` of the volume's newest snapshot S: the active file is
  ``volume-<vid>.<S>``, ``qcow2``;
- snapshot-delete-metadata of S while the attachment names S's file (the agent merged the
  newest layer down): the active file is the one the agent names from its live chain (a
  volume file of this volume, raw or qcow2; Cinder's records cannot say which file backs S
  once Cinder's own online deletes renamed the base). The agent then has Nova copy the
  attachment and compares Nova's answer with the live chain.

Loaded inside Cinder's API process with the extension: imports only Cinder.
"""

from __future__ import annotations

from typing import Any

from cinder import objects
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

QCOW2 = "qcow2"


def snapshot_file(volume_id: str, snapshot_id: str) -> str:
    """remotefs ``_get_new_snap_path``: the snapshot's overlay is ``volume-<vid>.<sid>``."""
    return f"volume-{volume_id}.{snapshot_id}"


def _snapshots(context: Any, volume_id: str) -> list[Any]:
    """The volume's live snapshot records, oldest first."""
    snaps = objects.SnapshotList.get_all_for_volume(context.elevated(), volume_id)
    return sorted(snaps, key=lambda s: (s.created_at, s.id))


def _attachments(volume: Any) -> list[Any]:
    """Attachments whose connection_info names a file (remotefs supports only one)."""
    return [
        a
        for a in (volume.volume_attachment or [])
        if isinstance(a.connection_info, dict) and "name" in a.connection_info
    ]


def _point_at(volume: Any, name: str, fmt: str) -> dict[str, Any]:
    """Attachment connection_info and admin metadata ``format`` name ``name``/``fmt``."""
    changed: dict[str, Any] = {}
    for att in _attachments(volume):
        info = dict(att.connection_info)
        if (info.get("name"), info.get("format")) != (name, fmt):
            info["name"], info["format"] = name, fmt
            att.connection_info = info
            att.save()
            changed[att.id] = {"name": name, "format": fmt}
    with volume.obj_as_admin():
        meta = volume.admin_metadata
        if meta.get("format") != fmt:
            meta["format"] = fmt
            volume.save()
            changed["admin_metadata.format"] = fmt
    if changed:
        LOG.info("qsnap: volume %s now points at %s (%s): %s", volume.id, name, fmt, changed)
    return changed


def on_create(context: Any, volume: Any, snapshot_id: str) -> None:
    """The first snapshot saves the volume's original format, as remotefs does."""
    others = [s for s in _snapshots(context, volume.id) if s.id != snapshot_id]
    with volume.obj_as_admin():
        meta = volume.admin_metadata
        if "base_format" not in meta and not others and "format" in meta:
            meta["base_format"] = meta["format"]
            volume.save()


def on_available(context: Any, snapshot: Any) -> dict[str, Any]:
    """The volume's newest snapshot became available: its overlay is the active file."""
    snaps = _snapshots(context, snapshot.volume_id)
    if not snaps or snaps[-1].id != snapshot.id:
        return {}  # a newer snapshot exists: the active file is that one's, not ours
    volume = objects.Volume.get_by_id(context.elevated(), snapshot.volume_id)
    return _point_at(volume, snapshot_file(volume.id, snapshot.id), QCOW2)


def on_deleted(context: Any, snapshot: Any, active: str, fmt: str) -> dict[str, Any]:
    """``snapshot``'s record is gone and the agent says ``active`` (``fmt``) is the volume's
    active file now. Applied only while the attachment still names the snapshot's own file
    (its layer was the top): a late resend can never move a newer pointer back."""
    volume = objects.Volume.get_by_id(context.elevated(), snapshot.volume_id)
    mine = snapshot_file(volume.id, snapshot.id)
    if not any(a.connection_info.get("name") == mine for a in _attachments(volume)):
        return {}  # an inner layer went, or a newer change already moved the pointer
    return _point_at(volume, active, fmt)
