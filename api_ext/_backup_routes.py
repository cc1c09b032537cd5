"""``/v1/backups``: validation at the edge, then the agent that should do the work.

Routing: a backup runs where its volumes are attached (the router's inventory), so
``create`` goes to the volume's (or instance's) host and refuses volumes spread over
several hosts. Everything else works on the backup repository, which every agent shares,
so any known host can answer: ``host`` (query, or body field for restore/prune) pins one,
otherwise the hosts are asked in name order and the first that answers wins. A host that
does not answer (transport failure or timeout) is skipped; an agent's own refusal
(``BackupNotFound``, ``InvalidRequest``...) is the answer. Every call here is safe to send
twice (delete/restore/prune refuse or no-op the second time), which is what makes trying
the next host after a timeout acceptable.

Handlers return ``(status, body)``; ``app.ApiApp`` makes responses and maps errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import routes
import webob

from api_ext import auth, schemas
from api_ext.router import NotRouted, Router, bounded
from hostagent.rpc import contract as api
from hostagent.rpc.client import om

LOG = logging.getLogger(__name__)
T = TypeVar("T")
Reply = tuple[int, object]


class BackupAgent(Protocol):
    """The backup half of ``hostagent.rpc.client.AgentAPI`` (RPC API 1.2)."""

    def create_backup(
        self,
        ctxt: Mapping[str, Any],
        *,
        volume_ids: list[str] | None,
        instance_uuid: str | None,
        incremental: bool,
    ) -> api.Operation: ...

    def list_backups(
        self, ctxt: Mapping[str, Any], volume_id: str | None
    ) -> list[dict[str, Any]]: ...

    def get_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> dict[str, Any]: ...

    def verify_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> api.Operation: ...

    def delete_backup(self, ctxt: Mapping[str, Any], backup_id: str) -> None: ...

    def restore_backup(
        self,
        ctxt: Mapping[str, Any],
        backup_id: str,
        *,
        to_path: str | None,
        volume_id: str | None,
        fmt: str,
    ) -> api.Operation: ...

    def prune_backups(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> dict[str, Any]: ...

    def start_prune(
        self,
        ctxt: Mapping[str, Any],
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
    ) -> api.Operation:
        """RPC 1.3: the prune as a cancellable operation (result = prune_backups' dict)."""
        ...


def connect(m: routes.Mapper) -> None:
    """The backup routes; actions are ``backup_*`` (dispatched to :class:`BackupRoutes`)."""
    base = "/v1/backups"
    m.connect(base, action="backup_create", conditions={"method": ["POST"]})
    m.connect(base, action="backup_list", conditions={"method": ["GET"]})
    m.connect(base + "/prune", action="backup_prune", conditions={"method": ["POST"]})
    m.connect(base + "/{backup_id}", action="backup_get", conditions={"method": ["GET"]})
    m.connect(base + "/{backup_id}", action="backup_delete", conditions={"method": ["DELETE"]})
    m.connect(base + "/{backup_id}/verify", action="backup_verify", conditions={"method": ["POST"]})
    m.connect(
        base + "/{backup_id}/restore", action="backup_restore", conditions={"method": ["POST"]}
    )


class BackupRoutes:
    """The handlers; the app hands in its router, agents and request helpers."""

    def __init__(
        self,
        router: Router,
        agents: Callable[[str], BackupAgent],
        authorize: Callable[[str, Any], None],
        body: Callable[[webob.Request], object],
        rpc_ctxt: Callable[[Any], dict[str, Any]],
    ) -> None:
        self._router = router
        self._agents = agents
        self._authorize = authorize
        self._body = body
        self._rpc_ctxt = rpc_ctxt

    def dispatch(self, action: str, req: webob.Request, ctx: Any, **match: str) -> Reply:
        handler: Callable[..., Reply] = getattr(self, "_" + action.removeprefix("backup_"))
        return handler(req, ctx, **match)

    # -- routing ------------------------------------------------------------------------
    def _create_host(self, create: schemas.BackupCreate) -> str:
        if create.instance_uuid is not None:
            return self._router.host_for_instance(create.instance_uuid)
        assert create.volume_ids is not None
        hosts = {v: self._router.host_for_volume(v) for v in create.volume_ids}
        if len(set(hosts.values())) > 1:
            where = ", ".join(f"{v} on {h}" for v, h in hosts.items())
            raise schemas.BadRequest(
                f"Invalid input: the volumes are attached on different hosts ({where}); "
                "back them up in one request per host"
            )
        return next(iter(hosts.values()))

    def _any_host(
        self, host: str | None, call: Callable[[BackupAgent], T], *, read: bool = False
    ) -> T:
        """``call`` on the pinned host, else on the first live host that answers.

        A ``read`` (list, get: nothing changes if it ran after all) gives each host only
        ``[api] host_timeout``, so a silent host costs seconds, not the RPC timeout; a call
        that changes something keeps the full timeout (a timed-out one may still run there).
        """
        hosts = self._router.known_hosts()
        if host is not None:
            if host not in hosts:
                raise NotRouted(f"unknown host {host!r}")
            return call(self._agents(host))
        if not hosts:
            raise om.MessagingException("no agent host is known yet")
        last: Exception | None = None
        for candidate in hosts:
            agent = self._agents(candidate)
            if read:
                agent = bounded(agent, self._router.settings.host_timeout)
            try:
                return call(agent)
            except om.RemoteError:
                raise  # the agent answered (with an untyped error)
            except om.MessagingException as exc:
                LOG.warning("backup call to host %s failed, trying the next: %s", candidate, exc)
                last = exc
        assert last is not None
        raise last

    # -- handlers -----------------------------------------------------------------------
    def _create(self, req: webob.Request, ctx: Any) -> Reply:
        self._authorize(auth.BACKUP_CREATE, ctx)
        create = schemas.backup_create(self._body(req))
        host = self._create_host(create)
        op = self._agents(host).create_backup(
            self._rpc_ctxt(ctx),
            volume_ids=list(create.volume_ids) if create.volume_ids is not None else None,
            instance_uuid=create.instance_uuid,
            incremental=create.incremental,
        )
        return 202, {"operation": op.to_wire()}

    def _list(self, req: webob.Request, ctx: Any) -> Reply:
        self._authorize(auth.BACKUP_LIST, ctx)
        host, volume_id = schemas.backup_list(req.query_string)
        rpc = self._rpc_ctxt(ctx)
        backups = self._any_host(host, lambda a: a.list_backups(rpc, volume_id), read=True)
        return 200, {"backups": backups}

    def _get(self, req: webob.Request, ctx: Any, backup_id: str) -> Reply:
        self._authorize(auth.BACKUP_GET, ctx)
        bid = schemas.backup_id(backup_id)
        host = schemas.host_query(req.query_string)["host"]
        rpc = self._rpc_ctxt(ctx)
        found = self._any_host(host, lambda a: a.get_backup(rpc, bid), read=True)
        return 200, {"backup": found}

    def _verify(self, req: webob.Request, ctx: Any, backup_id: str) -> Reply:
        self._authorize(auth.BACKUP_VERIFY, ctx)
        bid = schemas.backup_id(backup_id)
        host = schemas.host_query(req.query_string)["host"]
        self.no_body(req, "verify")
        rpc = self._rpc_ctxt(ctx)
        op = self._any_host(host, lambda a: a.verify_backup(rpc, bid))
        return 202, {"operation": op.to_wire()}

    def _delete(self, req: webob.Request, ctx: Any, backup_id: str) -> Reply:
        self._authorize(auth.BACKUP_DELETE, ctx)
        bid = schemas.backup_id(backup_id)
        host = schemas.host_query(req.query_string)["host"]
        rpc = self._rpc_ctxt(ctx)
        self._any_host(host, lambda a: a.delete_backup(rpc, bid))
        return 204, None

    def _restore(self, req: webob.Request, ctx: Any, backup_id: str) -> Reply:
        self._authorize(auth.BACKUP_RESTORE, ctx)
        r = schemas.backup_restore(backup_id, self._body(req))
        rpc = self._rpc_ctxt(ctx)
        op = self._any_host(
            r.host,
            lambda a: a.restore_backup(
                rpc, r.backup_id, to_path=r.to_path, volume_id=r.volume_id, fmt=r.fmt
            ),
        )
        return 202, {"operation": op.to_wire()}

    def _prune(self, req: webob.Request, ctx: Any) -> Reply:
        self._authorize(auth.BACKUP_PRUNE, ctx)
        p = schemas.backup_prune(self._body(req))
        rpc = self._rpc_ctxt(ctx)
        op = self._any_host(
            p.host,
            lambda a: a.start_prune(
                rpc,
                keep_last=p.keep_last,
                keep_daily=p.keep_daily,
                volume_id=p.volume_id,
                dry_run=p.dry_run,
            ),
        )
        return 202, {"operation": op.to_wire()}

    @staticmethod
    def no_body(req: webob.Request, what: str) -> None:
        """Bodiless POSTs: a body means the caller expects options we do not have."""
        if req.content_length or (req.is_body_readable and req.body_file.read(1)):
            raise schemas.BadRequest(f"Invalid input: {what} takes no request body")
