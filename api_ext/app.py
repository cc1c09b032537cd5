"""The WSGI application: routing (Routes), handlers (WebOb) and the error -> HTTP mapping.

Order per request: route (404) -> identity (401) -> policy (403) -> body size (413) ->
validation (400) -> host routing (404) -> agent RPC (typed errors -> 404/409/400, no answer
-> 503). Nothing reaches an agent before every check passed. Faults use Nova's body shape
(``{"badRequest": {"code": 400, "message": ...}}``) so python-novaclient reports them.
``/v1/backups`` lives in ``_backup_routes`` (same order, same error mapping).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast

import routes
import webob
from oslo_policy import policy

from api_ext import _backup_routes, auth, schemas
from api_ext.router import NotRouted, Router, ask_hosts, bounded
from hostagent.rpc import contract as api
from hostagent.rpc.client import om

LOG = logging.getLogger(__name__)
NOVA_VERSION_HEADERS = {
    "OpenStack-API-Version": "compute 2.1",
    "X-OpenStack-Nova-API-Version": "2.1",
    "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
}
_FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "requestEntityTooLarge",
    500: "computeFault",
    503: "serviceUnavailable",
}
# Typed agent errors -> HTTP status (anything else from an agent is a 500).
_AGENT_ERRORS: tuple[tuple[type[api.AgentRpcError], int], ...] = (
    (api.VolumeNotFound, 404),
    (api.InstanceNotFound, 404),
    (api.OperationNotFound, 404),
    (api.SnapshotNotFound, 404),
    (api.DiskBusy, 409),
    (api.NotCancellable, 409),
    (api.NovaUnavailable, 503),
    (api.InvalidRequest, 400),
)
# The same by name: a RemoteError naming one (an agent newer or older than this API, or a
# transport that does not rebuild typed errors) still deserves its status.
_AGENT_ERRORS_BY_NAME = {
    "SnapshotNotFound": 404,
    "BackupNotFound": 404,
    "VolumeNotFound": 404,
    "InstanceNotFound": 404,
    "DiskBusy": 409,
    "NotCancellable": 409,
    "NovaUnavailable": 503,
    "InvalidRequest": 400,
}
#: Hosts asked at once by the operations listing (each call blocks one thread).
_FANOUT_THREADS = 8


def _agent_error_status(exc: Exception) -> int | None:
    """HTTP status of a typed agent error (by class, then by class name), None if unknown."""
    for cls, status in _AGENT_ERRORS:
        if isinstance(exc, cls):
            return status
    names = [c.__name__ for c in type(exc).__mro__]
    if isinstance(exc, om.RemoteError):
        names.insert(0, str(exc.exc_type))
    return next((_AGENT_ERRORS_BY_NAME[n] for n in names if n in _AGENT_ERRORS_BY_NAME), None)


class AgentClient(Protocol):
    """What the API needs of ``hostagent.rpc.client.AgentAPI`` (a fake in unit tests)."""

    def create_assisted_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, create_info: Mapping[str, Any]
    ) -> api.Operation: ...

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
    ) -> api.Operation: ...

    def snapshot_instance(
        self,
        ctxt: Mapping[str, Any],
        instance_uuid: str,
        volume_ids: Sequence[str] | None,
        quiesce: api.Quiesce | bool = ...,
    ) -> api.Operation: ...

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation: ...

    def cancel_operation(self, ctxt: Mapping[str, Any], operation_id: str) -> api.Operation:
        """RPC 1.3: OperationNotFound (404), NotCancellable (409)."""
        ...

    def list_operations(
        self, ctxt: Mapping[str, Any], filters: api.OperationFilters | None = None
    ) -> list[api.Operation]: ...

    def delete_snapshot(
        self, ctxt: Mapping[str, Any], volume_id: str, snapshot_id: str
    ) -> api.Operation:
        """RPC 1.1: merge away a snapshot the agent manages (its ledger names it).

        Raises SnapshotNotFound / VolumeNotFound (404), DiskBusy (409), InvalidRequest (400).
        """
        ...


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_response(status: int, body: object, headers: Mapping[str, str] = {}) -> webob.Response:
    resp = webob.Response(status=status, content_type="application/json", charset="UTF-8")
    resp.body = json.dumps(body).encode()
    resp.headers.update(headers)
    return resp


def _fault(status: int, message: str, **extra: str) -> webob.Response:
    name = _FAULT_NAMES.get(status, "computeFault")
    return _json_response(status, {name: {"code": status, "message": message, **extra}})


#: The agent's own answer for an unexpected failure (hostagent/rpc/wire_errors.py,
#: ``INTERNAL_MESSAGE``): a generic text and the id its log holds the details under.
_AGENT_INTERNAL = re.compile(
    r"Internal error in the host agent \(error id (?P<id>[0-9a-f]{32})\); the details are in "
    r"that agent's log under this id\."
)


def _internal_fault(
    detail: object, agent_message: str = "", *, trace: bool = False
) -> webob.Response:
    """A 500 that names an error id and nothing else of the failure.

    An agent's generic answer keeps the agent's id (the details are in that agent's log);
    anything else (an older agent's raw text, an untyped remote error, a bug here) gets a
    new id, and ``detail`` (paths, exception text) goes to this service's log under it.
    """
    known = _AGENT_INTERNAL.fullmatch(agent_message.strip())
    if known is not None:
        LOG.error("host agent failed unexpectedly [error id %s]", known["id"])
        return _fault(500, known.group(0), error_id=known["id"])
    error_id = uuid.uuid4().hex
    LOG.error("request failed unexpectedly [error id %s]: %s", error_id, detail, exc_info=trace)
    message = (
        f"Internal error (error id {error_id}); the details are in the qsnap-api log under this id."
    )
    return _fault(500, message, error_id=error_id)


class ApiApp:
    """The qsnap API. ``agents(host)`` gives the RPC client of that host's agent."""

    def __init__(
        self,
        router: Router,
        agents: Callable[[str], AgentClient],
        enforcer: policy.Enforcer,
        *,
        max_body: int = 65536,
    ) -> None:
        self._router = router
        self._agents = agents
        self._enforcer = enforcer
        self._max_body = max_body
        self._map = routes.Mapper()
        m = self._map
        m.connect("/", action="versions", conditions={"method": ["GET"]})
        m.connect("/v2.1", action="version", conditions={"method": ["GET"]})
        m.connect("/v2.1/", action="version", conditions={"method": ["GET"]})
        base = "/v2.1/os-assisted-volume-snapshots"
        m.connect(base, action="create_assisted", conditions={"method": ["POST"]})
        m.connect(
            base + "/{snapshot_id}", action="delete_assisted", conditions={"method": ["DELETE"]}
        )
        m.connect("/v1/operations", action="list_operations", conditions={"method": ["GET"]})
        m.connect("/v1/operations/{op_id}", action="get_operation", conditions={"method": ["GET"]})
        m.connect(
            "/v1/operations/{op_id}/cancel",
            action="cancel_operation",
            conditions={"method": ["POST"]},
        )
        m.connect(
            "/v1/volumes/{volume_id}/snapshots/{snapshot_id}",
            action="delete_snapshot",
            conditions={"method": ["DELETE"]},
        )
        m.connect(
            "/v1/instances/{instance_uuid}/snapshots",
            action="snapshot_instance",
            conditions={"method": ["POST"]},
        )
        _backup_routes.connect(m)
        # Until hostagent.rpc.client.AgentAPI has RPC 1.2's backup methods, AgentClient cannot
        # require them (server.py hands AgentAPI in); BackupAgent describes what is called.
        backup_agents = cast(Callable[[str], _backup_routes.BackupAgent], agents)
        self._backups = _backup_routes.BackupRoutes(
            router, backup_agents, self._authorize, self._body, self._rpc_ctxt
        )

    def __call__(self, environ: auth.Environ, start_response: Callable[..., Any]) -> Any:
        return self._handle(webob.Request(environ))(environ, start_response)

    def _handle(self, req: webob.Request) -> webob.Response:
        match = self._map.match(environ=req.environ)
        if match is None:
            exists = self._map.match(req.path_info)  # any method
            return _fault(405 if exists else 404, f"{req.method} {req.path_info} not found")
        action = match.pop("action")
        try:
            if action in ("versions", "version"):
                resp = self._versions(req)
            else:
                ctx = auth.context_from_environ(req.environ)
                if action.startswith("backup_"):
                    code, body = self._backups.dispatch(action, req, ctx, **match)
                    resp = (
                        webob.Response(status=code) if body is None else _json_response(code, body)
                    )
                else:
                    resp = getattr(self, "_" + action)(req, ctx, **match)
        except auth.NotAuthenticated as exc:
            resp = _fault(401, str(exc))
        except policy.PolicyNotAuthorized:
            resp = _fault(403, f"Policy does not allow {action} to be performed.")
        except HttpError as exc:
            resp = _fault(exc.status, exc.message)
        except schemas.BadRequest as exc:
            resp = _fault(400, str(exc))
        except NotRouted as exc:
            resp = _fault(404, str(exc))
        except api.AgentRpcError as exc:
            status = _agent_error_status(exc)
            if status is not None:
                resp = _fault(status, exc.message or type(exc).__name__)
            else:  # AgentInternalError, or a typed error this API does not know
                resp = _internal_fault(f"{type(exc).__name__}: {exc}", exc.message)
        except om.MessagingTimeout:
            resp = _fault(503, "The host agent did not answer in time; retry later.")
        except om.RemoteError as exc:
            status = _agent_error_status(exc)
            if status is not None:
                resp = _fault(status, str(exc.value) or str(exc.exc_type))
            else:
                resp = _internal_fault(f"agent failed: {exc}", str(exc.value or ""))
        except om.MessagingException as exc:
            LOG.warning("agent unreachable: %s", exc)
            resp = _fault(503, "The host agent is unreachable; retry later.")
        except Exception as exc:  # a bug here: an id, never a bare 500 or exception text
            resp = _internal_fault(f"{action}: {type(exc).__name__}: {exc}", trace=True)
        if req.path_info.startswith("/v2.1"):
            resp.headers.update(NOVA_VERSION_HEADERS)
        return resp

    # -- helpers --------------------------------------------------------------------
    def _authorize(self, rule: str, ctx: Any) -> None:
        self._enforcer.authorize(rule, {"project_id": ctx.project_id}, ctx, do_raise=True)

    def _body(self, req: webob.Request) -> object:
        if req.content_length is not None and req.content_length > self._max_body:
            raise HttpError(413, f"Request body larger than {self._max_body} bytes")
        data = req.body_file.read(self._max_body + 1) if req.is_body_readable else b""
        if len(data) > self._max_body:
            raise HttpError(413, f"Request body larger than {self._max_body} bytes")
        if not data:
            raise schemas.BadRequest("Malformed request body: the body is empty")
        return schemas.parse_json(data)

    @staticmethod
    def _rpc_ctxt(ctx: Any) -> dict[str, Any]:
        return {
            "request_id": ctx.request_id,
            "user_id": ctx.user_id,
            "project_id": ctx.project_id,
            "roles": list(ctx.roles),
        }

    # -- handlers -------------------------------------------------------------------
    def _versions(self, req: webob.Request) -> webob.Response:
        v21 = {
            "id": "v2.1",
            "status": "CURRENT",
            "version": "2.1",
            "min_version": "2.1",
            "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": req.host_url + "/v2.1/"}],
        }
        if req.path_info.startswith("/v2.1"):
            return _json_response(200, {"version": v21})
        return _json_response(200, {"versions": [v21]})

    def _create_assisted(self, req: webob.Request, ctx: Any) -> webob.Response:
        self._authorize(auth.CREATE_ASSISTED, ctx)
        creq = schemas.create_request(self._body(req))
        host = self._router.host_for_volume(creq.volume_id)
        info = {"snapshot_id": creq.snapshot_id, "type": "qcow2", "new_file": creq.new_file}
        self._agents(host).create_assisted_snapshot(self._rpc_ctxt(ctx), creq.volume_id, info)
        body = {"snapshot": {"id": creq.snapshot_id, "volumeId": creq.volume_id}}
        return _json_response(200, body)

    def _delete_assisted(self, req: webob.Request, ctx: Any, snapshot_id: str) -> webob.Response:
        self._authorize(auth.DELETE_ASSISTED, ctx)
        dreq = schemas.delete_request(snapshot_id, req.query_string)
        host = self._router.host_for_volume(dreq.volume_id)
        info = {
            "volume_id": dreq.volume_id,
            "type": "qcow2",
            "file_to_merge": dreq.file_to_merge,
            "merge_target_file": dreq.merge_target_file,
        }
        self._agents(host).delete_assisted_snapshot(
            self._rpc_ctxt(ctx), dreq.volume_id, dreq.snapshot_id, info
        )
        return webob.Response(status=204)

    def _get_operation(self, req: webob.Request, ctx: Any, op_id: str) -> webob.Response:
        self._authorize(auth.GET_OPERATION, ctx)
        rpc = self._rpc_ctxt(ctx)
        op = self._on_op_host(req, op_id, lambda a: a.get_operation(rpc, op_id))
        return _json_response(200, {"operation": op.to_wire()})

    def _cancel_operation(self, req: webob.Request, ctx: Any, op_id: str) -> webob.Response:
        """202: the agent flagged it; the operation ends ``cancelled`` at its next chunk."""
        self._authorize(auth.CANCEL_OPERATION, ctx)
        _backup_routes.BackupRoutes.no_body(req, "cancel")
        rpc = self._rpc_ctxt(ctx)
        op = self._on_op_host(req, op_id, lambda a: a.cancel_operation(rpc, op_id))
        return _json_response(202, {"operation": op.to_wire()})

    def _on_op_host(
        self, req: webob.Request, op_id: str, call: Callable[[AgentClient], api.Operation]
    ) -> api.Operation:
        """``call`` on ``?host=``, else on every live host at once; the one that knows it.

        Each host gets ``[api] host_timeout``; one that does not answer in time (or is
        unreachable) is skipped like one that does not know the operation.
        """
        if not op_id.replace("-", "").isalnum() or len(op_id) > 64:  # agents use uuid4 ids
            raise schemas.BadRequest("Invalid input for field/attribute operation_id")
        host = req.GET.get("host")
        hosts = self._router.known_hosts()
        if host is not None and host not in hosts:
            raise HttpError(404, f"unknown host {host!r}")
        if host:
            try:
                return call(self._agents(host))
            except api.OperationNotFound:
                raise HttpError(404, f"operation {op_id} not found") from None
        timeout = self._router.settings.host_timeout
        found, skipped = ask_hosts(
            hosts, lambda h: call(bounded(self._agents(h), timeout)), timeout=timeout
        )
        if found is None:
            late = f" (no answer from {', '.join(sorted(skipped)[:5])})" if skipped else ""
            raise HttpError(404, f"operation {op_id} not found{late}")
        return found[1]

    def _snapshot_instance(
        self, req: webob.Request, ctx: Any, instance_uuid: str
    ) -> webob.Response:
        self._authorize(auth.INSTANCE_SNAPSHOT, ctx)
        ireq = schemas.instance_request(instance_uuid, self._body(req))
        host = self._router.host_for_instance(ireq.instance_uuid)
        op = self._agents(host).snapshot_instance(
            self._rpc_ctxt(ctx), ireq.instance_uuid, ireq.volume_ids, ireq.quiesce
        )
        return _json_response(202, {"operation": op.to_wire()})

    def _delete_snapshot(
        self, req: webob.Request, ctx: Any, volume_id: str, snapshot_id: str
    ) -> webob.Response:
        self._authorize(auth.DELETE_SNAPSHOT, ctx)
        vol, snap = schemas.snapshot_ids(volume_id, snapshot_id)
        host = self._router.host_for_volume(vol)
        op = self._agents(host).delete_snapshot(self._rpc_ctxt(ctx), vol, snap)
        return _json_response(202, {"operation": op.to_wire()})

    def _list_operations(self, req: webob.Request, ctx: Any) -> webob.Response:
        """Every known host's operations merged, newest first, ``limit`` applied last.

        Each agent is asked for its newest ``limit`` matches (RPC 1.4), so the newest
        ``limit`` of the merge are exact and ``limit=1`` costs one operation per host. A
        host whose agent fails or does not answer is reported in ``failed_hosts`` (host ->
        reason) instead of failing the whole listing, unless ``host=`` named it.
        """
        self._authorize(auth.LIST_OPERATIONS, ctx)
        host, filters = schemas.list_request(req.query_string)
        hosts = self._router.known_hosts()
        if host is not None and host not in hosts:
            raise HttpError(404, f"unknown host {host!r}")
        rpc_ctxt = self._rpc_ctxt(ctx)
        if host is not None:
            ops = self._agents(host).list_operations(rpc_ctxt, filters)
            failed: dict[str, str] = {}
        else:
            ops, failed = self._fan_out(hosts, rpc_ctxt, filters)
        ops.sort(key=lambda op: (op.created_at or "", op.id), reverse=True)
        body: dict[str, Any] = {"operations": [op.to_wire() for op in ops[: filters.limit]]}
        if failed:
            body["failed_hosts"] = failed
        return _json_response(200, body)

    def _fan_out(
        self, hosts: Sequence[str], rpc_ctxt: dict[str, Any], filters: api.OperationFilters
    ) -> tuple[list[api.Operation], dict[str, str]]:
        def one(host: str) -> list[api.Operation]:
            return self._agents(host).list_operations(rpc_ctxt, filters)

        ops: list[api.Operation] = []
        failed: dict[str, str] = {}
        if not hosts:
            return ops, failed
        with ThreadPoolExecutor(min(_FANOUT_THREADS, len(hosts))) as pool:
            futures = [(h, pool.submit(one, h)) for h in hosts]
            for host, future in futures:
                try:
                    ops.extend(future.result())
                except (om.MessagingException, api.AgentRpcError) as exc:
                    LOG.warning("listing operations of host %s failed: %s", host, exc)
                    failed[host] = (
                        "no answer in time"
                        if isinstance(exc, om.MessagingTimeout)
                        else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    )
        return ops, failed
