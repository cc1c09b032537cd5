"""Authentication (keystonemiddleware or noauth) and authorization (oslo.policy).

``[api] auth_strategy = keystone`` wraps the app in keystonemiddleware's ``auth_token``
(options in ``[keystone_authtoken]``): a request without a valid token gets 401 there.
``noauth`` is for tests and single-machine demos only; it must be configured explicitly:
``X-Auth-Token: USER[:PROJECT]`` names the caller (no token -> 401) and ``X-Roles: a,b``
its roles (``[api] noauth_roles`` when absent). Because that trusts whatever a caller claims,
noauth only starts on a loopback ``bind_host`` unless ``[api]
noauth_unsafe_allow_non_loopback`` is set, and it logs a warning at start either way
(:func:`check_noauth`). Either way the app sees keystonemiddleware's headers and builds an
``oslo_context`` RequestContext from them.

Policy defaults follow Nova: the assisted-snapshot API is for the volume service
(``role:service or role:admin``); every native ``/v1`` call (instance snapshots, agent-owned
snapshot deletes, operations, backups) is for admins: the volume service never calls ``/v1``.
Deployers override them in ``[api] policy_file``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_policy import policy

LOG = logging.getLogger(__name__)
Environ = dict[str, Any]
WsgiApp = Callable[[Environ, Callable[..., Any]], Iterable[bytes]]

SERVICE_OR_ADMIN = "role:service or role:admin"
ADMIN = "role:admin"

CREATE_ASSISTED = "qsnap:assisted_snapshot:create"
DELETE_ASSISTED = "qsnap:assisted_snapshot:delete"
INSTANCE_SNAPSHOT = "qsnap:instance_snapshot:create"
GET_OPERATION = "qsnap:operation:get"
LIST_OPERATIONS = "qsnap:operation:list"
CANCEL_OPERATION = "qsnap:operation:cancel"
DELETE_SNAPSHOT = "qsnap:snapshot:delete"
BACKUP_CREATE = "qsnap:backup:create"
BACKUP_LIST = "qsnap:backup:list"
BACKUP_GET = "qsnap:backup:get"
BACKUP_VERIFY = "qsnap:backup:verify"
BACKUP_DELETE = "qsnap:backup:delete"
BACKUP_RESTORE = "qsnap:backup:restore"
BACKUP_PRUNE = "qsnap:backup:prune"

RULES = [
    policy.DocumentedRuleDefault(
        CREATE_ASSISTED,
        SERVICE_OR_ADMIN,
        "Create an assisted volume snapshot (Nova compatible).",
        [{"method": "POST", "path": "/v2.1/os-assisted-volume-snapshots"}],
    ),
    policy.DocumentedRuleDefault(
        DELETE_ASSISTED,
        SERVICE_OR_ADMIN,
        "Delete an assisted volume snapshot (Nova compatible).",
        [{"method": "DELETE", "path": "/v2.1/os-assisted-volume-snapshots/{snapshot_id}"}],
    ),
    policy.DocumentedRuleDefault(
        INSTANCE_SNAPSHOT,
        ADMIN,
        "Snapshot all or some volumes of an instance at once.",
        [{"method": "POST", "path": "/v1/instances/{instance_uuid}/snapshots"}],
    ),
    policy.DocumentedRuleDefault(
        DELETE_SNAPSHOT,
        ADMIN,
        "Delete a snapshot the agent manages (merge it away, update the ledger).",
        [{"method": "DELETE", "path": "/v1/volumes/{volume_id}/snapshots/{snapshot_id}"}],
    ),
    policy.DocumentedRuleDefault(
        GET_OPERATION,
        ADMIN,
        "Show an operation's state, progress and error.",
        [{"method": "GET", "path": "/v1/operations/{operation_id}"}],
    ),
    policy.DocumentedRuleDefault(
        LIST_OPERATIONS,
        ADMIN,
        "List operations of every known host (or one), newest first.",
        [{"method": "GET", "path": "/v1/operations"}],
    ),
    policy.DocumentedRuleDefault(
        CANCEL_OPERATION,
        ADMIN,
        "Cancel a running backup, verify, prune or restore (snapshot operations are not "
        "cancellable).",
        [{"method": "POST", "path": "/v1/operations/{operation_id}/cancel"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_CREATE,
        ADMIN,
        "Back up volumes (listed, or all of an instance) into the backup repository.",
        [{"method": "POST", "path": "/v1/backups"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_LIST,
        ADMIN,
        "List backups in the repository, newest first.",
        [{"method": "GET", "path": "/v1/backups"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_GET,
        ADMIN,
        "Show a backup's metadata (volume, size, parent, source chain).",
        [{"method": "GET", "path": "/v1/backups/{backup_id}"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_VERIFY,
        ADMIN,
        "Verify every chunk of a backup against its hash.",
        [{"method": "POST", "path": "/v1/backups/{backup_id}/verify"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_DELETE,
        ADMIN,
        "Delete a backup (its chunks go at the next garbage collection).",
        [{"method": "DELETE", "path": "/v1/backups/{backup_id}"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_RESTORE,
        ADMIN,
        "Restore a backup to a new file or a new volume file on a share.",
        [{"method": "POST", "path": "/v1/backups/{backup_id}/restore"}],
    ),
    policy.DocumentedRuleDefault(
        BACKUP_PRUNE,
        ADMIN,
        "Delete the backups a retention rule does not keep, then collect garbage.",
        [{"method": "POST", "path": "/v1/backups/prune"}],
    ),
]

# Identity headers a client must never be able to set itself under noauth/keystone.
_IDENTITY_HEADERS = (
    "HTTP_X_IDENTITY_STATUS",
    "HTTP_X_USER_ID",
    "HTTP_X_USER_NAME",
    "HTTP_X_PROJECT_ID",
    "HTTP_X_PROJECT_NAME",
    "HTTP_X_SERVICE_ROLES",
    "HTTP_X_IS_ADMIN_PROJECT",
)


class NotAuthenticated(Exception):
    """The request carries no confirmed identity (401)."""


class UnsafeConfiguration(RuntimeError):
    """The configuration would expose an unauthenticated API; the service must not start."""


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address, or a name resolving only to such) is loopback.

    IPv4-mapped IPv6 addresses count as their IPv4 address; a name that does not resolve,
    or resolves to any non-loopback address, is not loopback.
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return False
        addrs = {str(info[4][0]) for info in infos}
        return bool(addrs) and all(_ip_is_loopback(a) for a in addrs)
    return _ip_is_loopback(str(ip))


def _ip_is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_noauth(conf: cfg.ConfigOpts) -> None:
    """Refuse noauth on a non-loopback ``bind_host`` unless explicitly allowed; warn anyway.

    Raises :class:`UnsafeConfiguration`. Nothing to check for keystone.
    """
    api = conf.api
    if api.auth_strategy != "noauth":
        return
    if is_loopback(api.bind_host):
        LOG.warning(
            "auth_strategy = noauth: every local caller is trusted as the user in its "
            "X-Auth-Token with the roles in its X-Roles header (default %s); listening on "
            "loopback %s only. For tests and single-machine demos.",
            list(api.noauth_roles),
            api.bind_host,
        )
        return
    if not api.noauth_unsafe_allow_non_loopback:
        raise UnsafeConfiguration(
            f"[api] auth_strategy = noauth on bind_host {api.bind_host!r}, which is not a "
            "loopback address: anyone reaching the port could claim any identity and role "
            "(X-Auth-Token, X-Roles). Use auth_strategy = keystone, bind to 127.0.0.1, or "
            "(UNSAFE, tests only) set [api] noauth_unsafe_allow_non_loopback = true."
        )
    LOG.warning(
        "UNSAFE: auth_strategy = noauth on non-loopback bind_host %s "
        "(noauth_unsafe_allow_non_loopback = true): ANY caller that reaches this port is "
        "trusted as whoever its X-Auth-Token names with the roles its X-Roles header claims.",
        api.bind_host,
    )


def make_enforcer(conf: cfg.ConfigOpts) -> policy.Enforcer:
    enforcer = policy.Enforcer(conf, policy_file=conf.api.policy_file)
    enforcer.register_defaults(RULES)
    return enforcer


def context_from_environ(environ: Environ) -> oslo_context.RequestContext:
    """The caller's context from keystonemiddleware's headers; raises NotAuthenticated."""
    if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
        raise NotAuthenticated("authentication required")
    ctx: oslo_context.RequestContext = oslo_context.RequestContext.from_environ(environ)
    if not ctx.user_id:
        raise NotAuthenticated("authentication required")
    return ctx


class NoAuthMiddleware:
    """Testing only: identity from ``X-Auth-Token: USER[:PROJECT]`` and ``X-Roles``."""

    def __init__(self, app: WsgiApp, default_roles: Iterable[str]) -> None:
        self._app = app
        self._default_roles = ",".join(default_roles)

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        for key in _IDENTITY_HEADERS:
            environ.pop(key, None)
        token = environ.get("HTTP_X_AUTH_TOKEN", "").strip()
        if token:
            user, _, project = token.partition(":")
            environ["HTTP_X_IDENTITY_STATUS"] = "Confirmed"
            environ["HTTP_X_USER_ID"] = user
            environ["HTTP_X_PROJECT_ID"] = project or user
            environ.setdefault("HTTP_X_ROLES", self._default_roles)
        else:
            environ["HTTP_X_IDENTITY_STATUS"] = "Invalid"
            environ.pop("HTTP_X_ROLES", None)
        return self._app(environ, start_response)


def wrap(app: WsgiApp, conf: cfg.ConfigOpts) -> WsgiApp:
    """``app`` behind the configured authentication middleware.

    Raises :class:`UnsafeConfiguration` for noauth on a non-loopback address (not allowed).
    """
    if conf.api.auth_strategy == "noauth":
        check_noauth(conf)
        return NoAuthMiddleware(app, conf.api.noauth_roles)
    from keystonemiddleware import auth_token

    wrapped: WsgiApp = auth_token.AuthProtocol(app, {"oslo_config_config": conf})
    return wrapped
