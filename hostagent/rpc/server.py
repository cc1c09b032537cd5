"""The agent's RPC server: topic ``qsnap-agent``, server = host, threading executor.

The endpoint is the edge: it turns wire arguments into typed requests once, delegates to an
injected :class:`AgentService`, and maps every failure (by :mod:`.wire_errors`) to a typed
error from ``hostagent.rpc.contract`` that the client rebuilds as the same class. Expected
errors are sent without server-side tracebacks; anything unexpected is logged here (its
text and traceback, under a fresh error id) and sent as ``AgentInternalError`` carrying only
that id, so the caller fails at once instead of waiting for a timeout and learns no paths.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from oslo_config import cfg

from hostagent.rpc import contract as api
from hostagent.rpc.agent_service import AgentService
from hostagent.rpc.messaging import messaging
from hostagent.rpc.wire_errors import internal_error, new_error_id, to_wire, wire_error
from qcow2.naming import is_uuid

om = messaging()
LOG = logging.getLogger(__name__)
T = TypeVar("T")

#: The typed RPC error for an exception (unexpected ones become AgentInternalError).
to_rpc_error = to_wire


class AgentEndpoint:
    """RPC API 1.5 (1.1 added ``delete_snapshot``, 1.2 the backup methods, 1.3
    ``cancel_operation`` and ``start_prune``, 1.4 ``list_operations`` newest first with the
    caller's limit, 1.5 ``reporter`` on the assisted create/delete).

    Methods return plain JSON-able data.
    """

    target = om.Target(version=api.RPC_VERSION)

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def _run(self, method: str, fn: Callable[[], T]) -> T:
        try:
            try:
                return fn()
            except api.AgentRpcError:
                raise
            except Exception as exc:
                typed = wire_error(exc)
                if typed is not None:
                    raise typed from exc
                error_id = new_error_id()
                LOG.exception(
                    "RPC %s failed unexpectedly [error id %s]: %s: %s",
                    method, error_id, type(exc).__name__, exc,
                )  # fmt: skip
                # ``from None``: oslo.messaging sends the formatted traceback, causes included
                raise internal_error(error_id) from None
        except api.AgentRpcError as exc:
            LOG.info("RPC %s refused: %s: %s", method, type(exc).__name__, exc)
            # ExpectedException records the current exc_info: the client gets ``exc`` typed.
            raise om.ExpectedException() from exc

    def create_assisted_snapshot(
        self,
        ctxt: dict[str, Any],
        volume_id: object,
        create_info: object,
        reporter: object = "cinder",
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.CreateSnapshotRequest.from_wire(volume_id, create_info, reporter)
            c = api.CallContext.from_wire(ctxt)
            return self._service.create_assisted_snapshot(c, req).to_wire()

        return self._run("create_assisted_snapshot", call)

    def delete_assisted_snapshot(
        self,
        ctxt: dict[str, Any],
        volume_id: object,
        snapshot_id: object,
        delete_info: object,
        reporter: object = "cinder",
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.DeleteSnapshotRequest.from_wire(volume_id, snapshot_id, delete_info, reporter)
            c = api.CallContext.from_wire(ctxt)
            return self._service.delete_assisted_snapshot(c, req).to_wire()

        return self._run("delete_assisted_snapshot", call)

    def snapshot_instance(
        self, ctxt: dict[str, Any], instance_uuid: object, volume_ids: object, quiesce: object
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.InstanceSnapshotRequest.from_wire(instance_uuid, volume_ids, quiesce)
            c = api.CallContext.from_wire(ctxt)
            return self._service.snapshot_instance(c, req).to_wire()

        return self._run("snapshot_instance", call)

    def delete_snapshot(
        self, ctxt: dict[str, Any], volume_id: object, snapshot_id: object
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.DeleteOwnedSnapshotRequest.from_wire(volume_id, snapshot_id)
            c = api.CallContext.from_wire(ctxt)
            return self._service.delete_snapshot(c, req).to_wire()

        return self._run("delete_snapshot", call)

    def get_operation(self, ctxt: dict[str, Any], op_id: object) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            if not isinstance(op_id, str) or not op_id or len(op_id) > 64:
                raise api.InvalidRequest(f"bad operation id {op_id!r}")
            return self._service.get_operation(api.CallContext.from_wire(ctxt), op_id).to_wire()

        return self._run("get_operation", call)

    def list_operations(self, ctxt: dict[str, Any], filters: object) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            f = api.OperationFilters.from_wire(filters)
            ops = self._service.list_operations(api.CallContext.from_wire(ctxt), f)
            return [op.to_wire() for op in ops]

        return self._run("list_operations", call)

    def get_inventory(self, ctxt: dict[str, Any]) -> dict[str, Any]:
        return self._run(
            "get_inventory",
            lambda: self._service.get_inventory(api.CallContext.from_wire(ctxt)).to_wire(),
        )

    # -- 1.2: backups ---------------------------------------------------------------------
    @staticmethod
    def _backup_id(backup_id: object) -> str:
        if not isinstance(backup_id, str) or not is_uuid(backup_id):
            raise api.InvalidRequest(f"backup_id must be a UUID, got {backup_id!r}")
        return backup_id.lower()

    @staticmethod
    def _volume_id(volume_id: object) -> str | None:
        if volume_id is None:
            return None
        if not isinstance(volume_id, str) or not is_uuid(volume_id):
            raise api.InvalidRequest(f"volume_id must be a UUID, got {volume_id!r}")
        return volume_id.lower()

    def create_backup(
        self,
        ctxt: dict[str, Any],
        volume_ids: object = None,
        instance_uuid: object = None,
        incremental: object = False,
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.CreateBackupRequest.from_wire(volume_ids, instance_uuid, incremental)
            return self._service.create_backup(api.CallContext.from_wire(ctxt), req).to_wire()

        return self._run("create_backup", call)

    def list_backups(self, ctxt: dict[str, Any], volume_id: object = None) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            vol = self._volume_id(volume_id)
            return self._service.list_backups(api.CallContext.from_wire(ctxt), vol)

        return self._run("list_backups", call)

    def get_backup(self, ctxt: dict[str, Any], backup_id: object) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            bid = self._backup_id(backup_id)
            return self._service.get_backup(api.CallContext.from_wire(ctxt), bid)

        return self._run("get_backup", call)

    def verify_backup(self, ctxt: dict[str, Any], backup_id: object) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            bid = self._backup_id(backup_id)
            return self._service.verify_backup(api.CallContext.from_wire(ctxt), bid).to_wire()

        return self._run("verify_backup", call)

    def delete_backup(self, ctxt: dict[str, Any], backup_id: object) -> None:
        def call() -> None:
            bid = self._backup_id(backup_id)
            self._service.delete_backup(api.CallContext.from_wire(ctxt), bid)

        self._run("delete_backup", call)

    def restore_backup(
        self,
        ctxt: dict[str, Any],
        backup_id: object,
        to_path: object = None,
        volume_id: object = None,
        fmt: object = "qcow2",
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.RestoreBackupRequest.from_wire(backup_id, to_path, volume_id, fmt)
            return self._service.restore_backup(api.CallContext.from_wire(ctxt), req).to_wire()

        return self._run("restore_backup", call)

    def prune_backups(
        self,
        ctxt: dict[str, Any],
        keep_last: object = None,
        keep_daily: object = None,
        volume_id: object = None,
        dry_run: object = False,
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.PruneBackupsRequest.from_wire(keep_last, keep_daily, volume_id, dry_run)
            return self._service.prune_backups(api.CallContext.from_wire(ctxt), req)

        return self._run("prune_backups", call)

    # -- 1.3: cancel, prune as an operation -------------------------------------------------
    def cancel_operation(self, ctxt: dict[str, Any], operation_id: object) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            if not isinstance(operation_id, str) or not operation_id or len(operation_id) > 64:
                raise api.InvalidRequest(f"bad operation id {operation_id!r}")
            c = api.CallContext.from_wire(ctxt)
            return self._service.cancel_operation(c, operation_id).to_wire()

        return self._run("cancel_operation", call)

    def start_prune(
        self,
        ctxt: dict[str, Any],
        keep_last: object = None,
        keep_daily: object = None,
        volume_id: object = None,
        dry_run: object = False,
    ) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            req = api.PruneBackupsRequest.from_wire(keep_last, keep_daily, volume_id, dry_run)
            return self._service.start_prune(api.CallContext.from_wire(ctxt), req).to_wire()

        return self._run("start_prune", call)


def get_server(transport: Any, host: str, service: AgentService) -> Any:
    """An (unstarted) RPC server for ``host``; the caller starts, stops and waits it."""
    target = om.Target(topic=api.RPC_TOPIC, server=host)
    return om.get_rpc_server(
        transport,
        target,
        [AgentEndpoint(service)],
        executor="threading",
        access_policy=om.DefaultRPCAccessPolicy,
    )


def serve(conf: cfg.ConfigOpts, service: AgentService, *, ready: Callable[[], None]) -> None:
    """Run the RPC server until SIGTERM/SIGINT; ``ready`` is called once it consumes."""
    transport = om.get_rpc_transport(conf)
    server = get_server(transport, conf.host, service)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        ready()
        stop.wait()
    finally:
        server.stop()
        server.wait()
        transport.cleanup()


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``--transport-url``/``--host`` overrides; the rest goes to oslo.config."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--transport-url")
    parser.add_argument("--host")
    return parser.parse_known_args(argv)
