"""Request schemas: Nova's os-assisted-volume-snapshots schema, byte for byte, plus ours.

Nova validates the create body with JSON Schema (extra fields rejected) and reads
``delete_info`` from the query string with ``parse_qs`` then ``json.loads``. We do the same,
then build the agent's typed requests (``hostagent.rpc.contract``) so UUIDs and Cinder file
names are checked here, at the edge, before anything travels. Every failure is a
:class:`BadRequest` whose message names the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jsonschema

from hostagent.rpc import contract as api
from qcow2.naming import is_uuid

# nova/api/openstack/compute/schemas/assisted_volume_snapshots.py (v2.1)
SNAPSHOTS_CREATE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "snapshot": {
            "type": "object",
            "properties": {
                "volume_id": {"type": "string", "minLength": 1},
                "create_info": {
                    "type": "object",
                    "properties": {
                        "snapshot_id": {"type": "string", "minLength": 1},
                        "type": {"type": "string", "enum": ["qcow2"]},
                        "new_file": {"type": "string", "minLength": 1},
                        "id": {"type": "string", "minLength": 1},
                    },
                    "required": ["snapshot_id", "type", "new_file"],
                    "additionalProperties": False,
                },
            },
            "required": ["volume_id", "create_info"],
            "additionalProperties": False,
        }
    },
    "required": ["snapshot"],
    "additionalProperties": False,
}

_NULLABLE_NAME = {"type": ["string", "null"], "minLength": 1}
DELETE_INFO: dict[str, Any] = {
    "type": "object",
    "properties": {
        "volume_id": {"type": "string", "minLength": 1},
        "type": {"type": "string", "enum": ["qcow2"]},
        "file_to_merge": _NULLABLE_NAME,
        "merge_target_file": _NULLABLE_NAME,
    },
    "required": ["volume_id", "type", "file_to_merge", "merge_target_file"],
    "additionalProperties": False,
}

INSTANCE_SNAPSHOT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "snapshot": {
            "type": "object",
            "properties": {
                "volume_ids": {
                    "type": ["array", "null"],
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": 64,
                },
                "quiesce": {"type": "string", "enum": ["required", "preferred", "none"]},
            },
            "additionalProperties": False,
        }
    },
    "required": ["snapshot"],
    "additionalProperties": False,
}


class BadRequest(ValueError):
    """Invalid input; the message names the field and is safe to return to the caller."""


def _validate(schema: dict[str, Any], data: object) -> None:
    validator = jsonschema.Draft4Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "body"
        raise BadRequest(f"Invalid input for field/attribute {path}. {error.message}")


def _plain_name(value: object, field: str) -> None:
    """Refuse path games before the agent's naming check (which gives a vaguer message)."""
    if isinstance(value, str) and ("/" in value or ".." in value or "\x00" in value):
        raise BadRequest(f"Invalid input for field/attribute {field}: must be a plain file name")


#: Deepest nesting a request may have. Every schema here needs at most 3 levels
#: (``{"snapshot": {"volume_ids": [...]}}``); CPython's decoder recurses per level and
#: raises RecursionError near 1000, so depth is counted BEFORE decoding.
MAX_JSON_DEPTH = 16
#: Largest ``delete_info`` (characters, as decoded from the query string). Cinder sends four
#: short fields (~300 characters); the query string is not bounded like a request body is.
MAX_DELETE_INFO = 4096
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`BadRequest` when ``text`` nests arrays/objects deeper than ``limit``.

    A scan of the structural characters outside strings (escapes honoured), linear in
    ``len(text)``; malformed text is left for the decoder to refuse.
    """
    depth = 0
    in_string = False
    skip = -1  # index of the character an escape consumed
    for match in _JSON_SPECIAL.finditer(text):
        i, c = match.start(), match.group()
        if in_string:
            if i == skip:
                continue
            if c == "\\":
                skip = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                raise BadRequest(f"Malformed request body: JSON nested deeper than {limit} levels")
        elif c in "]}":
            depth -= 1


def parse_json(body: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Decode a JSON request; any malformed, undecodable or too deep input is BadRequest."""
    try:
        text = body if isinstance(body, str) else body.decode(json.detect_encoding(body))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Malformed request body: {exc}") from None
    check_json_depth(text, max_depth)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"Malformed request body: {exc}") from None
    except RecursionError:  # a second line of defence: never a bare 500
        raise BadRequest("Malformed request body: JSON nested too deeply") from None


def _typed(fn: Any, *args: object) -> Any:
    try:
        return fn(*args)
    except api.InvalidRequest as exc:
        raise BadRequest(f"Invalid input: {exc}") from None


def create_request(body: object) -> api.CreateSnapshotRequest:
    """The typed assisted-create request from a parsed POST body."""
    _validate(SNAPSHOTS_CREATE, body)
    assert isinstance(body, dict)
    snap = body["snapshot"]
    info = dict(snap["create_info"])
    _plain_name(info["new_file"], "create_info/new_file")
    info.pop("id", None)  # Nova accepts and ignores it
    req: api.CreateSnapshotRequest = _typed(
        api.CreateSnapshotRequest.from_wire, snap["volume_id"], info
    )
    return req


def delete_request(snapshot_id: str, query_string: str) -> api.DeleteSnapshotRequest:
    """The typed assisted-delete request from the URL id and ``?delete_info=<json>``."""
    values = parse_qs(query_string, keep_blank_values=True).get("delete_info")
    if not values:
        raise BadRequest("Invalid input: query parameter delete_info is required")
    if len(values) > 1:
        raise BadRequest("Invalid input: query parameter delete_info given more than once")
    if len(values[0]) > MAX_DELETE_INFO:
        raise BadRequest(
            f"Invalid input: query parameter delete_info longer than {MAX_DELETE_INFO} characters"
        )
    info = parse_json(values[0])
    try:
        _validate(DELETE_INFO, info)
    except BadRequest as exc:
        raise BadRequest(str(exc).replace("attribute ", "attribute delete_info/", 1)) from None
    assert isinstance(info, dict)
    for field in ("file_to_merge", "merge_target_file"):
        _plain_name(info[field], f"delete_info/{field}")
    req: api.DeleteSnapshotRequest = _typed(
        api.DeleteSnapshotRequest.from_wire, info["volume_id"], snapshot_id, info
    )
    return req


def instance_request(instance_uuid: str, body: object) -> api.InstanceSnapshotRequest:
    """The typed native instance-snapshot request (``quiesce`` defaults to preferred)."""
    _validate(INSTANCE_SNAPSHOT, body)
    assert isinstance(body, dict)
    snap = body["snapshot"]
    req: api.InstanceSnapshotRequest = _typed(
        api.InstanceSnapshotRequest.from_wire,
        instance_uuid,
        snap.get("volume_ids"),
        snap.get("quiesce", "preferred"),
    )
    return req


#: Query parameters of ``GET /v1/operations``; anything else is refused (a typo must not
#: silently widen the listing).
LIST_PARAMS = ("host", "state", "kind", "volume_id", "limit")
MAX_LIST_LIMIT = 1000


def _one_param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"Invalid input: query parameter {name} given more than once")
    if not values[0]:
        raise BadRequest(f"Invalid input for field/attribute {name}: must not be empty")
    return values[0]


def _choice(value: str | None, name: str, allowed: list[str]) -> str | None:
    if value is not None and value not in allowed:
        raise BadRequest(
            f"Invalid input for field/attribute {name}: {value!r} is not one of {allowed}"
        )
    return value


def list_request(query_string: str) -> tuple[str | None, api.OperationFilters]:
    """``(host or None, filters)`` from ``GET /v1/operations``'s query string."""
    params = parse_qs(query_string, keep_blank_values=True)
    if unknown := sorted(set(params) - set(LIST_PARAMS)):
        raise BadRequest(f"Invalid input: unknown query parameters {unknown}")
    host = _one_param(params, "host")
    if host is not None and (len(host) > 255 or not host.isprintable()):
        raise BadRequest("Invalid input for field/attribute host: not a host name")
    state = _choice(_one_param(params, "state"), "state", [s.value for s in api.OperationState])
    kind = _choice(_one_param(params, "kind"), "kind", [k.value for k in api.OperationKind])
    volume_id = _one_param(params, "volume_id")
    raw_limit = _one_param(params, "limit")
    limit = 100
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            raise BadRequest(
                f"Invalid input for field/attribute limit: an integer in 1..{MAX_LIST_LIMIT}"
            )
        limit = int(raw_limit)
    wire = {"state": state, "kind": kind, "volume_id": volume_id, "limit": limit}
    filters: api.OperationFilters = _typed(api.OperationFilters.from_wire, wire)
    return host, filters


def snapshot_ids(volume_id: str, snapshot_id: str) -> tuple[str, str]:
    """Both path ids of ``DELETE /v1/volumes/{v}/snapshots/{s}`` as lower-case UUIDs."""
    for field, value in (("volume_id", volume_id), ("snapshot_id", snapshot_id)):
        if not is_uuid(value):
            raise BadRequest(f"Invalid input for field/attribute {field}: must be a UUID")
    return volume_id.lower(), snapshot_id.lower()


# -- backups ------------------------------------------------------------------------------
_UUID_STR = {"type": "string", "minLength": 1, "maxLength": 64}
_HOST = {"type": "string", "minLength": 1, "maxLength": 255}
BACKUP_CREATE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "backup": {
            "type": "object",
            "properties": {
                "volume_ids": {
                    "type": "array",
                    "items": _UUID_STR,
                    "minItems": 1,
                    "maxItems": 64,
                },
                "instance_uuid": _UUID_STR,
                "incremental": {"type": "boolean"},
            },
            "additionalProperties": False,
        }
    },
    "required": ["backup"],
    "additionalProperties": False,
}
RESTORE_FORMATS = ("qcow2", "raw")
#: Longest ``to_path`` accepted (PATH_MAX is 4096; nothing sane comes close).
MAX_PATH = 1024
BACKUP_RESTORE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "restore": {
            "type": "object",
            "properties": {
                "to_path": {"type": "string", "minLength": 2, "maxLength": MAX_PATH},
                "volume_id": _UUID_STR,
                "format": {"type": "string", "enum": list(RESTORE_FORMATS)},
            },
            "additionalProperties": False,
        },
        "host": _HOST,
    },
    "required": ["restore"],
    "additionalProperties": False,
}
_COUNT = {"type": ["integer", "null"], "minimum": 0, "maximum": 100000}
BACKUP_PRUNE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prune": {
            "type": "object",
            "properties": {
                "keep_last": _COUNT,
                "keep_daily": _COUNT,
                "volume_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 64},
                "dry_run": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        "host": _HOST,
    },
    "required": ["prune"],
    "additionalProperties": False,
}


def _uuid_field(value: str, field: str) -> str:
    if not is_uuid(value):
        raise BadRequest(f"Invalid input for field/attribute {field}: must be a UUID")
    return value.lower()


@dataclass(frozen=True)
class BackupCreate:
    """``POST /v1/backups``: exactly one of ``volume_ids`` / ``instance_uuid``."""

    volume_ids: tuple[str, ...] | None
    instance_uuid: str | None
    incremental: bool


@dataclass(frozen=True)
class BackupRestore:
    """``POST /v1/backups/{id}/restore``: exactly one of ``to_path`` / ``volume_id``."""

    backup_id: str
    to_path: str | None
    volume_id: str | None
    fmt: str
    host: str | None


@dataclass(frozen=True)
class BackupPrune:
    """``POST /v1/backups/prune``: a rule that keeps something, or none (agent default)."""

    keep_last: int | None
    keep_daily: int | None
    volume_id: str | None
    dry_run: bool
    host: str | None


def backup_create(body: object) -> BackupCreate:
    _validate(BACKUP_CREATE, body)
    assert isinstance(body, dict)
    b = body["backup"]
    vols, inst = b.get("volume_ids"), b.get("instance_uuid")
    if (vols is None) == (inst is None):
        raise BadRequest(
            "Invalid input: give exactly one of backup/volume_ids, backup/instance_uuid"
        )
    volume_ids = None
    if vols is not None:
        volume_ids = tuple(_uuid_field(v, "backup/volume_ids") for v in vols)
        if len(set(volume_ids)) != len(volume_ids):
            raise BadRequest("Invalid input for field/attribute backup/volume_ids: duplicates")
    instance = _uuid_field(inst, "backup/instance_uuid") if inst is not None else None
    return BackupCreate(volume_ids, instance, bool(b.get("incremental", False)))


def backup_id(value: str) -> str:
    """A backup id from the URL (the repository names backups by UUID)."""
    return _uuid_field(value, "backup_id")


def _host_param(params: dict[str, list[str]]) -> str | None:
    host = _one_param(params, "host")
    if host is not None and (len(host) > 255 or not host.isprintable()):
        raise BadRequest("Invalid input for field/attribute host: not a host name")
    return host


def host_query(query_string: str, allowed: tuple[str, ...] = ("host",)) -> dict[str, str | None]:
    """The ``allowed`` query parameters (each at most once); anything else is refused."""
    params = parse_qs(query_string, keep_blank_values=True)
    if unknown := sorted(set(params) - set(allowed)):
        raise BadRequest(f"Invalid input: unknown query parameters {unknown}")
    out: dict[str, str | None] = {"host": _host_param(params)}
    for name in allowed:
        if name != "host":
            out[name] = _one_param(params, name)
    return out


def backup_list(query_string: str) -> tuple[str | None, str | None]:
    """``(host, volume_id)`` from ``GET /v1/backups``'s query string."""
    q = host_query(query_string, ("host", "volume_id"))
    vol = q["volume_id"]
    return q["host"], _uuid_field(vol, "volume_id") if vol is not None else None


def _plain_path(path: str) -> str:
    """Absolute, normalised, printable: the agent still checks it against its share roots."""
    if not path.startswith("/") or "\x00" in path or not path.isprintable():
        raise BadRequest("Invalid input for field/attribute restore/to_path: an absolute path")
    parts = path.split("/")
    if ".." in parts or "." in parts or "" in parts[1:]:
        raise BadRequest(
            "Invalid input for field/attribute restore/to_path: must be normalised "
            "(no '.', '..', '//' or trailing '/')"
        )
    return path


def backup_restore(backup: str, body: object) -> BackupRestore:
    bid = backup_id(backup)
    _validate(BACKUP_RESTORE, body)
    assert isinstance(body, dict)
    r = body["restore"]
    to_path, vol = r.get("to_path"), r.get("volume_id")
    if (to_path is None) == (vol is None):
        raise BadRequest("Invalid input: give exactly one of restore/to_path, restore/volume_id")
    return BackupRestore(
        bid,
        _plain_path(to_path) if to_path is not None else None,
        _uuid_field(vol, "restore/volume_id") if vol is not None else None,
        r.get("format", "qcow2"),
        _checked_host(body.get("host")),
    )


def _checked_host(host: object) -> str | None:
    if host is not None and (not isinstance(host, str) or not host.isprintable()):
        raise BadRequest("Invalid input for field/attribute host: not a host name")
    return host


def backup_prune(body: object) -> BackupPrune:
    _validate(BACKUP_PRUNE, body)
    assert isinstance(body, dict)
    p = body["prune"]
    keep_last, keep_daily = p.get("keep_last"), p.get("keep_daily")
    # neither given: the agent's default retention ([backup]); given, it must keep something
    if (keep_last is not None or keep_daily is not None) and not (keep_last or keep_daily):
        raise BadRequest(
            "Invalid input: prune must keep something: give prune/keep_last or "
            "prune/keep_daily >= 1"
        )
    vol = p.get("volume_id")
    return BackupPrune(
        keep_last,
        keep_daily,
        _uuid_field(vol, "prune/volume_id") if vol is not None else None,
        bool(p.get("dry_run", False)),
        _checked_host(body.get("host")),
    )
