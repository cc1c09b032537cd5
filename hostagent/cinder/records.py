"""Cinder records for snapshots the agent takes itself (qsnap's Cinder API extension).

Instance snapshots are taken by the agent, not by Cinder's driver, so Cinder learns of them
through three actions of ``api_ext.cinder_extension``: create-snapshot-metadata (``creating``),
finalize-snapshot-metadata (``available`` | ``error``) and snapshot-delete-metadata. This
module is the client side of those actions; it lives in hostagent/ because the agent makes
the calls and must not import api_ext/ (layering). ``api_ext.cinderclient_ext`` re-exports
the body builders and the manager for cinderclient users.

cinderclient binds the LAST ``base.Manager`` subclass of an extension module, so this module
defines exactly one (:class:`QsnapSnapshotManager`); :class:`CinderMeta` is a plain class.
"""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass
from typing import Any

from cinderclient import base
from cinderclient.v3.volume_snapshots import Snapshot

from hostagent.cinder.status import (
    AuthSettings,
    CallRejected,
    CallUnreachable,
    Clock,
    PasswordSettings,
    RetryPolicy,
    Sleep,
    make_session,
    retry_call,
)
from hostagent.errors import QsnapAgentError
from qcow2.naming import is_uuid

CREATE = "create-snapshot-metadata"
FINALIZE = "finalize-snapshot-metadata"
DELETE = "snapshot-delete-metadata"
#: Name under which the manager is bound on a cinderclient ``Client``.
EXTENSION_NAME = "qsnap_snapshots"


def create_body(
    volume_id: str,
    name: str | None = None,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
    checkpoint: bool = False,
) -> dict[str, Any]:
    """Only set fields travel: the server rejects unknown ones and treats absent as unset."""
    args: dict[str, Any] = {"volume_id": volume_id}
    if checkpoint:
        args["checkpoint"] = True
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


def delete_body(active: ActiveFile | None = None) -> dict[str, Any]:
    """``active``: the volume's active file once the snapshot's layer went (the extension
    points the attachment and the volume's format at it if they named that layer)."""
    if active is None:
        return {DELETE: {}}
    return {DELETE: {"active": active.name, "format": active.format}}


@dataclass(frozen=True)
class ActiveFile:
    """A volume's active file and its format, as Cinder's records must name them.

    Journaled with a delete-metadata notice as ``name|format`` (:meth:`encode`) so a resend
    after a restart carries exactly what the live chain said when the layer went.
    """

    name: str
    format: str

    def encode(self) -> str:
        return f"{self.name}|{self.format}"

    @classmethod
    def decode(cls, text: str | None) -> ActiveFile | None:
        if not text:
            return None
        name, _, fmt = text.partition("|")
        return cls(name, fmt)


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
        checkpoint: bool = False,
    ) -> Snapshot:
        """Record snapshot ``snapshot_id`` of ``volume_id`` in ``creating``; no driver call.
        ``checkpoint``: a backup's checkpoint (a plain volume delete cascades over those)."""
        body = create_body(volume_id, name, description, metadata, checkpoint)
        resp, data = self._post(snapshot_id, body)
        return Snapshot(self, data["snapshot"], loaded=True, resp=resp)

    def finalize(
        self, snapshot: Any, status: str = "available", progress: str | None = None
    ) -> Snapshot:
        """``creating`` -> ``status`` (``available`` gets progress 100% unless given)."""
        resp, data = self._post(snapshot, finalize_body(status, progress))
        return Snapshot(self, data["snapshot"], loaded=True, resp=resp)

    def delete_metadata(self, snapshot: Any, active: ActiveFile | None = None) -> None:
        """Drop Cinder's record only; the snapshot's file is the caller's business."""
        self._post(snapshot, delete_body(active))


class MetaAction(enum.Enum):
    """A record change owed to Cinder, journaled as a notification whose ``status`` is the
    value (never a Cinder status string, so it cannot be mistaken for a status report)."""

    FINALIZE_AVAILABLE = "qsnap:finalize:available"
    FINALIZE_ERROR = "qsnap:finalize:error"
    DELETE = "qsnap:delete-metadata"

    @classmethod
    def of(cls, status: str) -> MetaAction | None:
        try:
            return cls(status)
        except ValueError:
            return None


class MetaError(QsnapAgentError):
    """A record call that did not land; ``rejected`` means 4xx (retrying now cannot help)."""

    def __init__(self, snapshot_id: str, what: str, detail: str, *, rejected: bool) -> None:
        super().__init__(f"{what} for snapshot {snapshot_id}: {detail}")
        self.snapshot_id = snapshot_id
        self.rejected = rejected


class CinderMeta:
    """The agent's calls to the extension, each retried under one :class:`RetryPolicy`.

    Every call is idempotent as seen from here, because recovery re-sends whatever it is
    unsure landed: a finalize that finds the record already in the wanted state, a finalize
    ``error`` or a delete that finds no record, count as done.
    """

    def __init__(
        self,
        auth: AuthSettings,
        retry: RetryPolicy | None = None,
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
        client: Any = None,
    ) -> None:
        self._retry = retry or RetryPolicy()
        self._sleep, self._clock = sleep, clock
        if client is None:
            from cinderclient import api_versions
            from cinderclient import client as cclient
            from cinderclient.extension import Extension

            kwargs: dict[str, Any] = {}
            if isinstance(auth, PasswordSettings):
                kwargs = {"region_name": auth.region_name, "endpoint_type": auth.interface}
            client = cclient.Client(
                api_versions.APIVersion("3.0"),
                session=make_session(auth, self._retry.request_timeout),
                extensions=[Extension(EXTENSION_NAME, sys.modules[__name__])],
                **kwargs,
            )
        self._client = client

    def _call(self, snapshot_id: str, what: str, fn: Any) -> Any:
        if not is_uuid(snapshot_id):
            raise ValueError(f"snapshot id {snapshot_id!r} is not a UUID")
        try:
            return retry_call(fn, self._retry, sleep=self._sleep, clock=self._clock)[0]
        except CallRejected as exc:
            raise MetaError(snapshot_id, what, str(exc), rejected=True) from exc
        except CallUnreachable as exc:
            raise MetaError(snapshot_id, what, exc.last, rejected=False) from exc

    def _status(self, snapshot_id: str) -> str | None:
        """The record's status, None when Cinder has no such snapshot."""
        try:
            snap = self._call(
                snapshot_id, "get", lambda: self._client.volume_snapshots.get(snapshot_id)
            )
        except MetaError as exc:
            if exc.rejected and "404" in str(exc):
                return None
            raise
        return str(snap.status)

    def create(
        self, snapshot_id: str, volume_id: str, description: str, *, checkpoint: bool = False
    ) -> None:
        """Record ``snapshot_id`` of ``volume_id`` in ``creating`` (a retry is accepted);
        a backup's ``checkpoint`` is named so a person sees what it is."""
        mgr = getattr(self._client, EXTENSION_NAME)
        kind = "qsnap-backup-checkpoint" if checkpoint else "qsnap"
        name = f"{kind}-{snapshot_id[:8]}"
        self._call(
            snapshot_id,
            "create-snapshot-metadata",
            lambda: mgr.create_metadata(
                snapshot_id, volume_id, name=name, description=description, checkpoint=checkpoint
            ),
        )

    def apply(self, snapshot_id: str, action: MetaAction, active: ActiveFile | None = None) -> None:
        """Carry out ``action``; raises :class:`MetaError` when it did not land."""
        mgr = getattr(self._client, EXTENSION_NAME)
        if action is MetaAction.DELETE:
            try:
                self._call(snapshot_id, DELETE, lambda: mgr.delete_metadata(snapshot_id, active))
            except MetaError as exc:
                if not (exc.rejected and self._status(snapshot_id) is None):
                    raise
            return
        status = "available" if action is MetaAction.FINALIZE_AVAILABLE else "error"
        try:
            self._call(snapshot_id, FINALIZE, lambda: mgr.finalize(snapshot_id, status))
        except MetaError as exc:
            if not exc.rejected:
                raise
            now = self._status(snapshot_id)
            if now == status or (now is None and status == "error"):
                return  # an earlier attempt landed, or there was never a record to fail
            raise
