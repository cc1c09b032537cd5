"""Client side of the agent's RPC API (1.4) and the inventory fan-out.

Callers get typed results (``Operation``, ``Inventory``) and typed errors from
``hostagent.rpc.contract``. Typed errors need the transport to allow that module
(:func:`get_transport` does); with any other transport a ``RemoteError`` naming one of our
errors is converted here, so callers can rely on ``except VolumeNotFound``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from oslo_config import cfg

from hostagent.rpc import contract as api
from hostagent.rpc.messaging import messaging

om = messaging()

#: Fanout topic on which every agent casts ``inventory_update(host, volumes, generation)``.
INVENTORY_TOPIC = "qsnap-inventory"
_ERRORS_BY_NAME = {cls.__name__: cls for cls in api.RPC_ERRORS}
#: The most ``list_operations`` answers (``OperationFilters`` refuses a larger limit).
_LIST_MAX = 1000


def get_transport(conf: cfg.ConfigOpts, url: str | None = None) -> Any:
    """An RPC transport that rebuilds the agent's typed errors on the client side."""
    return om.get_rpc_transport(conf, url=url, allowed_remote_exmods=[api.ERRORS_MODULE])


class AgentAPI:
    """RPC client for one host's agent. Long operations return their Operation at once.

    API version history:
        1.0 - create/delete assisted snapshot, snapshot_instance, get/list operations,
              get_inventory
        1.1 - delete_snapshot (a snapshot the agent took itself: ledger + Cinder record)
        1.2 - create/list/get/verify/delete/restore/prune backups
        1.3 - cancel_operation (backup/verify/prune/restore; new state ``cancelled``, new
              error NotCancellable), start_prune (prune as an operation)
        1.4 - list_operations answers the newest ``limit`` matches, newest first (same
              arguments; a 1.3 agent answered the oldest)
        1.5 - create/delete_assisted_snapshot take ``reporter`` ("cinder" | "nova": with
              "nova" the agent posts no status to Cinder; Nova's driver does)
    """

    VERSION_CAP = "1.5"

    def __init__(
        self, transport: Any, host: str, *, timeout: float = 60.0, exchange: str | None = None
    ) -> None:
        """``exchange``: the agent's ``control_exchange`` when the transport's configuration
        has another one (nova-compute's is ``nova``); None: the transport's."""
        target = om.Target(exchange=exchange, topic=api.RPC_TOPIC, version="1.0")
        self.host = host
        self._client = om.get_rpc_client(
            transport, target, version_cap=self.VERSION_CAP, timeout=timeout
        )

    def _call(
        self, ctxt: Mapping[str, Any], method: str, *, version: str = "1.0", **kwargs: Any
    ) -> Any:
        cctxt = self._client.prepare(server=self.host, version=version)
        try:
            return cctxt.call(dict(ctxt), method, **kwargs)
        except om.RemoteError as exc:
            typed = _ERRORS_BY_NAME.get(str(exc.exc_type))
            if typed is None:
                raise
            raise typed(str(exc.value)) from exc

    def create_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        create_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = api.Reporter.CINDER,
    ) -> api.Operation:
        extra = _reporter_args(reporter)
        out = self._call(
            ctxt,
            "create_assisted_snapshot",
            volume_id=volume_id,
            create_info=dict(create_info),
            **extra,
        )
        return api.Operation.from_wire(out)

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = api.Reporter.CINDER,
    ) -> api.Operation:
        out = self._call(
            ctxt,
            "delete_assisted_snapshot",
            volume_id=volume_id,
            snapshot_id=snapshot_id,
            delete_info=dict(delete_info),
            **_reporter_args(reporter),
        )
        return api.Operation.from_wire(out)

    def snapshot_instance(
        self,
        ctxt: Mapping[str, Any],
        instance_uuid: str,
        volume_ids: Sequence[str] | None,
        quiesce: api.Quiesce | bool = api.Quiesce.PREFERRED,
    ) -> api.Operation:
        q = quiesce.value if isinstance(quiesce, api.Quiesce) else quiesce
        out = self._call(
            ctxt,
            "snapshot_instance",
            instance_uuid=instance_uuid,
            volume_ids=list(volume_ids) if volume_ids is not None else None,
            quiesce=q,
        )
        return api.Operation.from_wire(out)

    def delete_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, snapshot_id: str
    ) -> api.Operation:
        """Merge away an agent-owned snapshot (1.1); ``SnapshotNotFound`` if not in the ledger."""
        out = self._call(
            ctxt, "delete_snapshot", version="1.1", volume_id=volume_id, snapshot_id=snapshot_id
        )
        return api.Operation.from_wire(out)

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation:
        return api.Operation.from_wire(self._call(ctxt, "get_operation", op_id=op_id))

    def list_operations(
        self, ctxt: Mapping[str, Any], filters: api.OperationFilters | None = None
    ) -> list[api.Operation]:
        """The newest ``filters.limit`` matching operations, newest first (RPC 1.4).

        A 1.3 agent (refusing 1.4) is asked at 1.0 for its maximum, which it answers oldest
        first: the newest ``limit`` of those are kept, right while it holds at most that many.
        """
        f = filters or api.OperationFilters()
        try:
            out = self._call(ctxt, "list_operations", version="1.4", filters=f.to_wire())
        except (om.RemoteError, om.UnsupportedVersion) as exc:
            # over a real bus a RemoteError naming it; the fake driver raises it as itself
            if isinstance(exc, om.RemoteError) and str(exc.exc_type) != "UnsupportedVersion":
                raise
            wide = dataclasses.replace(f, limit=_LIST_MAX).to_wire()
            old = [
                api.Operation.from_wire(op)
                for op in self._call(ctxt, "list_operations", filters=wide)
            ]
            old.sort(key=lambda op: (op.created_at or "", op.id), reverse=True)
            return old[: f.limit]
        return [api.Operation.from_wire(op) for op in out]

    def get_inventory(self, ctxt: Mapping[str, Any]) -> api.Inventory:
        return api.Inventory.from_wire(self._call(ctxt, "get_inventory"))

    def with_timeout(self, timeout: float) -> AgentAPI:
        """This host's client waiting at most ``timeout`` s for each answer (probes and
        fan-outs, where a host that does not answer is skipped); cheap, shares the transport."""
        bounded = copy.copy(self)
        bounded._client = self._client.prepare(timeout=timeout)
        return bounded

    # -- 1.2: backups (every one refuses with BackupNotFound/InvalidRequest, typed) -------
    def create_backup(
        self,
        ctxt: Mapping[str, Any],
        *,
        volume_ids: Sequence[str] | None,
        instance_uuid: str | None,
        incremental: bool,
    ) -> api.Operation:
        out = self._call(
            ctxt,
            "create_backup",
            version="1.2",
            volume_ids=list(volume_ids) if volume_ids is not None else None,
            instance_uuid=instance_uuid,
            incremental=incremental,
        )
        return api.Operation.from_wire(out)

    def list_backups(self, ctxt: Mapping[str, Any], volume_id: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call(
            ctxt, "list_backups", version="1.2", volume_id=volume_id
        )
        return out

    def get_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call(ctxt, "get_backup", version="1.2", backup_id=backup_id)
        return out

    def verify_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> api.Operation:
        out = self._call(ctxt, "verify_backup", version="1.2", backup_id=backup_id)
        return api.Operation.from_wire(out)

    def delete_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> None:
        self._call(ctxt, "delete_backup", version="1.2", backup_id=backup_id)

    def restore_backup(
        self,
        ctxt: Mapping[str, Any],
        backup_id: str,
        *,
        to_path: str | None,
        volume_id: str | None,
        fmt: str,
    ) -> api.Operation:
        out = self._call(
            ctxt,
            "restore_backup",
            version="1.2",
            backup_id=backup_id,
            to_path=to_path,
            volume_id=volume_id,
            fmt=fmt,
        )
        return api.Operation.from_wire(out)

    def prune_backups(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        rule = _prune_rule(keep_last, keep_daily, volume_id, dry_run)
        out: dict[str, Any] = self._call(ctxt, "prune_backups", version="1.2", **rule)
        return out

    # -- 1.3 ------------------------------------------------------------------------------
    def cancel_operation(self, ctxt: Mapping[str, Any], operation_id: str) -> api.Operation:
        """Stop a running backup/verify/prune/restore at its next chunk; the operation now.

        ``OperationNotFound``; ``NotCancellable`` when it ended or is a snapshot operation.
        """
        out = self._call(ctxt, "cancel_operation", version="1.3", operation_id=operation_id)
        return api.Operation.from_wire(out)

    def start_prune(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> api.Operation:
        """Prune as an operation (its result is what ``prune_backups`` returns)."""
        rule = _prune_rule(keep_last, keep_daily, volume_id, dry_run)
        return api.Operation.from_wire(self._call(ctxt, "start_prune", version="1.3", **rule))


def _reporter_args(reporter: api.Reporter) -> dict[str, Any]:
    """``reporter`` travels (at 1.5) only when it is not the 1.0 behaviour, so a Cinder-wired
    caller still talks to older agents; a 1.4 agent refuses "nova" rather than report twice."""
    if reporter is api.Reporter.CINDER:
        return {}
    return {"version": "1.5", "reporter": reporter.value}


def _prune_rule(
    keep_last: int | None, keep_daily: int | None, volume_id: str | None, dry_run: bool
) -> dict[str, Any]:
    """The wire arguments of both prunes (1.2's synchronous one and 1.3's operation)."""
    return {
        "keep_last": keep_last,
        "keep_daily": keep_daily,
        "volume_id": volume_id,
        "dry_run": dry_run,
    }


class InventoryFanout:
    """Publishes an agent's inventory to every listener with a fanout cast (fire and forget).

    An API process that routes requests runs an RPC server on ``INVENTORY_TOPIC`` with an
    ``inventory_update(ctxt, host, volumes, generation)`` endpoint method.
    """

    def __init__(self, transport: Any) -> None:
        target = om.Target(topic=INVENTORY_TOPIC, fanout=True, version="1.0")
        self._client = om.get_rpc_client(transport, target, version_cap="1.0")

    def __call__(self, inventory: api.Inventory) -> None:
        wire = inventory.to_wire()
        self._client.cast(
            {},
            "inventory_update",
            host=wire["host"],
            volumes=wire["volumes"],
            generation=wire["generation"],
        )
