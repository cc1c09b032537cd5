"""Cinder API extension: snapshot records for snapshots the qsnap agent already took.

The agent snapshots whole instances itself (one atomic, quiesced libvirt snapshot of many
disks), so Cinder's driver must not act; Cinder only needs the records so that it can list,
and later delete, those snapshots normally. Three actions on ``/snapshots/{id}/action``:

- ``create-snapshot-metadata``: record snapshot ``{id}`` (the agent picks the uuid, so the
  overlay file name is known before Cinder is asked) of a volume, status ``creating``.
  A retry with the same id and volume while still ``creating`` returns the same record.
- ``finalize-snapshot-metadata``: ``creating`` -> ``available`` | ``error`` (or a progress
  update in ``creating``).
- ``snapshot-delete-metadata``: drop the record and its quota, no storage operation.

Each also keeps the volume's active file as Cinder's remotefs driver keeps it (attachment
``connection_info`` name/format, admin metadata ``format``): :mod:`api_ext.cinder_connection`.

A backup's checkpoint (``"checkpoint": true`` at create) is marked :data:`CHECKPOINT_MARK`.
``DELETE /volumes/{id}`` of a volume whose EVERY snapshot carries that mark cascades over
them (:class:`QsnapVolumeDeleteExtension`): a backup's checkpoint never blocks the volume's
delete, while a volume with any other snapshot is refused by Cinder as ever.

Finalize and delete act ONLY on records create-snapshot-metadata made: it sets the record's
``provider_id`` to :data:`MARK` (or :data:`CHECKPOINT_MARK`). A snapshot Cinder made itself
(its driver owns the storage) is refused with 409 and left exactly as it was. Why
``provider_id``: Cinder 29 snapshots have no admin metadata, and their metadata is writable
by project members (``volume:update_snapshot_metadata``), so a key there could be forged or
removed by a tenant; ``provider_id`` is a driver-owned column no API request sets, the NFS/remotefs
drivers leave empty, and Cinder only ever fills when empty. Records made before this mark
existed are refused too (reset or delete them through Cinder's own admin actions).

Loaded INSIDE Cinder's process (``osapi_volume_extension =
api_ext.cinder_extension.Qsnap_snapshot_metadata``): it imports only Cinder, its
libraries and :mod:`api_ext.cinder_connection` (Cinder only), never qsnap's other
packages. Access is the policy rule ``qsnap:snapshot_metadata`` (default: Cinder admins or
the ``service`` role), overridable in Cinder's policy file.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import webob
from cinder import exception, objects, quota, utils
from cinder import policy as cinder_policy
from cinder.api import extensions, validation
from cinder.api.openstack import wsgi
from cinder.api.validation import parameter_types
from cinder.api.views import snapshots as snapshot_views
from cinder.db import api as db
from cinder.objects import fields
from oslo_db import exception as db_exc
from oslo_log import log as logging
from oslo_policy import policy as oslo_policy

from api_ext import cinder_connection

LOG = logging.getLogger(__name__)
QUOTAS = quota.QUOTAS
CONF = quota.CONF

POLICY = "qsnap:snapshot_metadata"
POLICY_DEFAULT = "rule:admin_api or role:service"
#: ``provider_id`` of every record create-snapshot-metadata makes (see the module doc).
MARK = "qsnap:recorded"
#: ``provider_id`` of a backup checkpoint's record (also one of ours).
CHECKPOINT_MARK = "qsnap:checkpoint"
OURS = (MARK, CHECKPOINT_MARK)

# Canonical lowercase uuids only: the snapshot id becomes part of a file name
# (volume-<uuid>.<snapshot-uuid>) on the share, so no braces, urn: or uppercase variants.
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_UUID = {"type": "string", "pattern": _UUID_RE.pattern}
# A volume's file: volume-<volume uuid>[.<snapshot uuid>] (remotefs naming), nothing else.
_U = _UUID_RE.pattern[1:-1]
_ACTIVE_RE = re.compile(rf"^volume-{_U}(\.{_U})?$")
_METADATA = copy.deepcopy(parameter_types.extra_specs)

CREATE_SCHEMA = {
    "type": "object",
    "properties": {
        "create-snapshot-metadata": {
            "type": "object",
            "properties": {
                "volume_id": _UUID,
                "name": parameter_types.nullable_string,
                "description": parameter_types.description,
                "metadata": _METADATA,
                "checkpoint": {"type": "boolean"},
            },
            "required": ["volume_id"],
            "additionalProperties": False,
        }
    },
    "required": ["create-snapshot-metadata"],
    "additionalProperties": False,
}

FINALIZE_SCHEMA = {
    "type": "object",
    "properties": {
        "finalize-snapshot-metadata": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["available", "error", "creating"]},
                "progress": {"type": "string", "pattern": "^(100|[1-9]?[0-9])%$"},
            },
            "required": ["status"],
            "additionalProperties": False,
        }
    },
    "required": ["finalize-snapshot-metadata"],
    "additionalProperties": False,
}

DELETE_SCHEMA = {
    "type": "object",
    "properties": {
        "snapshot-delete-metadata": {
            "type": ["object", "null"],
            "properties": {
                # the volume's active file once this snapshot's layer went (both or neither)
                "active": {"type": "string", "pattern": _ACTIVE_RE.pattern},
                "format": {"type": "string", "enum": ["raw", "qcow2"]},
            },
            "dependencies": {"active": ["format"], "format": ["active"]},
            "additionalProperties": False,
        }
    },
    "required": ["snapshot-delete-metadata"],
    "additionalProperties": False,
}

# Volume states in which a snapshot of it may exist (as Cinder's create_snapshot force=True).
_VOLUME_OK = ("available", "in-use")
# Record states we may drop: anything not owned by a running driver operation.
_DELETABLE = (
    fields.SnapshotStatus.AVAILABLE,
    fields.SnapshotStatus.ERROR,
    fields.SnapshotStatus.CREATING,
    fields.SnapshotStatus.ERROR_DELETING,
)


def _authorize(context: Any) -> None:
    """Cinder's enforcer only knows its own rules: register ours once, then ask it."""
    cinder_policy.init()
    enforcer = cinder_policy._ENFORCER  # init() guarantees it; Cinder has no public getter
    assert enforcer is not None
    if POLICY not in enforcer.registered_rules:
        enforcer.register_default(
            oslo_policy.RuleDefault(
                POLICY, POLICY_DEFAULT, description="Record agent-taken snapshots in Cinder"
            )
        )
        enforcer.load_rules(force_reload=True)
    context.authorize(POLICY, target={"project_id": context.project_id})


def _check_id(snapshot_id: str) -> None:
    if not _UUID_RE.match(snapshot_id):
        raise webob.exc.HTTPBadRequest(explanation=f"snapshot id {snapshot_id!r} is not a uuid")


def _check_ours(snapshot: Any, action: str) -> None:
    """409 unless create-snapshot-metadata made this record (nothing is changed)."""
    if snapshot.provider_id not in OURS:
        raise webob.exc.HTTPConflict(
            explanation=f"snapshot {snapshot.id} was not recorded through "
            f"os-qsnap-snapshot-metadata (Cinder owns it): {action} refused"
        )


class QsnapSnapshotMetadataController(wsgi.Controller):
    """The three actions; all state changes are conditional updates, so racing calls lose."""

    _view_builder_class = snapshot_views.ViewBuilder

    @wsgi.response(HTTPStatus.ACCEPTED)
    @wsgi.action("create-snapshot-metadata")
    @validation.schema(CREATE_SCHEMA)
    def _create_metadata(self, req: Any, id: str, body: dict[str, Any]) -> dict[str, Any]:
        context = req.environ["cinder.context"]
        _authorize(context)
        _check_id(id)
        args = body["create-snapshot-metadata"]
        volume = objects.Volume.get_by_id(context, args["volume_id"])  # 404 if unknown
        existing = self._existing(context, id)
        if existing is not None:
            ours = existing.provider_id in OURS and not existing.deleted
            if ours and existing.volume_id == volume.id and existing.status == "creating":
                return self._view_builder.detail(req, existing)  # an idempotent retry
            raise webob.exc.HTTPConflict(explanation=f"snapshot {id} already exists")
        self._check_volume(volume)
        snapshot = self._record(context, id, volume, args)
        cinder_connection.on_create(context, volume, id)
        LOG.info("qsnap recorded snapshot %s of volume %s", id, volume.id)
        return self._view_builder.detail(req, snapshot)

    @staticmethod
    def _existing(context: Any, snapshot_id: str) -> Any:
        """Also sees deleted rows: their id is still taken in the table."""
        try:
            return objects.Snapshot.get_by_id(context.elevated(read_deleted="yes"), snapshot_id)
        except exception.SnapshotNotFound:
            return None

    @staticmethod
    def _check_volume(volume: Any) -> None:
        if not volume.host:
            raise webob.exc.HTTPBadRequest(explanation="volume is not scheduled to a host")
        if volume.status not in _VOLUME_OK:
            raise webob.exc.HTTPConflict(
                explanation=f"volume status {volume.status!r} is not one of {_VOLUME_OK}"
            )
        if volume.migration_status not in (None, "", "success", "error"):
            raise webob.exc.HTTPConflict(explanation="volume is migrating")

    @staticmethod
    def _reserve_opts(
        context: Any, volume_size: int, volume_type_id: str | None, sign: int
    ) -> dict[str, int]:
        opts = {"snapshots": sign}
        if not CONF.no_snapshot_gb_quota:
            opts["gigabytes"] = sign * volume_size
        QUOTAS.add_volume_type_opts(context, opts, volume_type_id)
        return opts

    def _record(self, context: Any, snapshot_id: str, volume: Any, args: dict[str, Any]) -> Any:
        """Quota first, then the row (with our id), as Cinder's create_snapshot_in_db does."""
        project = volume.project_id
        opts = self._reserve_opts(context, volume.size, volume.volume_type_id, 1)
        try:
            reservations = QUOTAS.reserve(context, project_id=project, **opts)
        except exception.OverQuota as exc:
            raise webob.exc.HTTPRequestEntityTooLarge(
                explanation=f"snapshot quota exceeded: {exc}", headers={"Retry-After": "0"}
            ) from exc
        values = {
            "id": snapshot_id,
            "volume_id": volume.id,
            "user_id": volume.user_id,
            "project_id": project,
            "status": fields.SnapshotStatus.CREATING,
            "progress": "0%",
            "volume_size": volume.size,
            "display_name": args.get("name"),
            "display_description": args.get("description"),
            "volume_type_id": volume.volume_type_id,
            "encryption_key_id": volume.encryption_key_id,
            "metadata": args.get("metadata") or {},
            "provider_id": CHECKPOINT_MARK if args.get("checkpoint") else MARK,
        }
        try:
            db.snapshot_create(context, values)  # objects.Snapshot.create() refuses a set id
        except db_exc.DBDuplicateEntry as exc:
            QUOTAS.rollback(context, reservations, project_id=project)
            raise webob.exc.HTTPConflict(explanation=f"snapshot {snapshot_id} exists") from exc
        except Exception:
            QUOTAS.rollback(context, reservations, project_id=project)
            raise
        QUOTAS.commit(context, reservations, project_id=project)
        return objects.Snapshot.get_by_id(context, snapshot_id)

    @wsgi.response(HTTPStatus.OK)
    @wsgi.action("finalize-snapshot-metadata")
    @validation.schema(FINALIZE_SCHEMA)
    def _finalize(self, req: Any, id: str, body: dict[str, Any]) -> dict[str, Any]:
        context = req.environ["cinder.context"]
        _authorize(context)
        _check_id(id)
        args = body["finalize-snapshot-metadata"]
        status = args["status"]
        progress = args.get("progress") or ("100%" if status == "available" else None)
        snapshot = objects.Snapshot.get_by_id(context, id)  # 404 if unknown
        _check_ours(snapshot, "finalize-snapshot-metadata")
        changes = {"status": status}
        if progress:
            changes["progress"] = progress
        expected = {"status": fields.SnapshotStatus.CREATING, "provider_id": OURS}
        if not snapshot.conditional_update(changes, expected):
            if snapshot.status == status == "available":  # a retry: converge the pointers
                cinder_connection.on_available(context, snapshot)
            raise webob.exc.HTTPConflict(
                explanation=f"snapshot {id} is {snapshot.status!r}, not 'creating'"
            )
        if status == "available":  # the overlay is the volume's active file now
            changes["connection"] = cinder_connection.on_available(context, snapshot)
        LOG.info("qsnap finalized snapshot %s: %s", id, changes)
        return self._view_builder.detail(req, objects.Snapshot.get_by_id(context, id))

    @wsgi.action("snapshot-delete-metadata")
    @validation.schema(DELETE_SCHEMA)
    def _delete_metadata(self, req: Any, id: str, body: dict[str, Any]) -> webob.Response:
        context = req.environ["cinder.context"]
        _authorize(context)
        _check_id(id)
        snapshot = objects.Snapshot.get_by_id(context, id)  # 404 if unknown
        _check_ours(snapshot, "snapshot-delete-metadata")
        args = body.get("snapshot-delete-metadata") or {}
        active = args.get("active")
        if active is not None and not active.startswith(f"volume-{snapshot.volume_id}"):
            raise webob.exc.HTTPBadRequest(explanation=f"{active!r} is not a file of the volume")
        # Claim it first so no driver operation can start on it meanwhile.
        if not snapshot.conditional_update(
            {"status": fields.SnapshotStatus.DELETING},
            {"status": _DELETABLE, "provider_id": OURS},
        ):
            raise webob.exc.HTTPConflict(
                explanation=f"snapshot {id} is {snapshot.status!r}: a storage operation owns it"
            )
        project = snapshot.project_id
        opts = self._reserve_opts(context, snapshot.volume_size, snapshot.volume_type_id, -1)
        try:
            reservations = QUOTAS.reserve(context, project_id=project, **opts)
        except Exception:  # as Cinder's manager: a usage glitch must not keep the record
            LOG.exception("qsnap: snapshot usage update failed for %s", id)
            reservations = None
        db.volume_glance_metadata_delete_by_snapshot(context, id)
        snapshot.destroy()
        if active is not None:
            cinder_connection.on_deleted(context, snapshot, active, args["format"])
        if reservations:
            QUOTAS.commit(context, reservations, project_id=project)
        LOG.info("qsnap removed the record of snapshot %s (no storage operation)", id)
        return webob.Response(status_int=HTTPStatus.ACCEPTED)


class QsnapVolumeDeleteExtension(wsgi.Controller):
    """A plain ``DELETE /volumes/{id}`` cascades over the volume's backup checkpoints."""

    @wsgi.extends
    def delete(self, req: Any, id: str) -> Iterator[None]:
        """Before Cinder's own delete: if the caller did not ask for ``cascade`` and every
        snapshot of the volume is a qsnap backup checkpoint (``CHECKPOINT_MARK``, a column no
        API request sets), ask for it. Cinder then checks and deletes exactly as for
        ``--cascade`` (statuses, the driver's offline merges). Any other snapshot: unchanged,
        Cinder refuses as ever. Why: backups must not block a volume's lifecycle (issue 15)."""
        context = req.environ["cinder.context"]
        if not utils.get_bool_param("cascade", req.params):
            try:
                snaps = objects.SnapshotList.get_all_for_volume(context, id)
            except exception.NotFound:  # Cinder's delete answers 404 itself
                snaps = []
            if snaps and all(s.provider_id == CHECKPOINT_MARK for s in snaps):
                LOG.info("qsnap: delete of volume %s cascades over %d backup checkpoint(s)",
                         id, len(snaps))  # fmt: skip
                req.GET["cascade"] = "true"
        yield None


class Qsnap_snapshot_metadata(extensions.ExtensionDescriptor):
    """Snapshot records for snapshots taken by the qsnap agent, without driver calls."""

    name = "QsnapSnapshotMetadata"
    alias = "os-qsnap-snapshot-metadata"
    updated = "2025-01-01T00:00:00+00:00"

    def get_controller_extensions(self) -> list[Any]:
        controller = QsnapSnapshotMetadataController()
        return [
            extensions.ControllerExtension(self, "snapshots", controller),
            extensions.ControllerExtension(self, "volumes", QsnapVolumeDeleteExtension()),
        ]
