"""TEST-BED auth middleware for the Nova peer: stands in for keystonemiddleware's authtoken.

Nova 34 has no noauth mode: its paste pipeline always runs ``authtoken`` then
``keystonecontext``. The bed copies Nova's api-paste.ini with ``[filter:authtoken]`` pointing
here. A token ``user:project`` (Cinder's noauth form) becomes the identity headers
keystonecontext reads; user ``admin`` gets the admin, member, reader and service roles (the
service role lets Cinder call os-assisted-volume-snapshots). No token: 401. It checks nothing
else and must never be used outside the test bed. Runs inside nova-api (``.venv-nova``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_IDENTITY = (
    "HTTP_X_IDENTITY_STATUS", "HTTP_X_USER_ID", "HTTP_X_USER_NAME", "HTTP_X_PROJECT_ID",
    "HTTP_X_PROJECT_NAME", "HTTP_X_TENANT_ID", "HTTP_X_TENANT_NAME", "HTTP_X_ROLES",
    "HTTP_X_ROLE", "HTTP_X_SERVICE_CATALOG", "HTTP_X_USER_DOMAIN_ID",
    "HTTP_X_PROJECT_DOMAIN_ID", "HTTP_X_SERVICE_ROLES",
)  # fmt: skip


def identity(token: str) -> dict[str, str] | None:
    """The identity headers (WSGI keys) for ``user:project``; None when malformed."""
    user, sep, project = token.partition(":")
    if not sep or not user or not project:
        return None
    roles = "admin,member,reader,service" if user == "admin" else "member,reader"
    return {
        "HTTP_X_IDENTITY_STATUS": "Confirmed",
        "HTTP_X_USER_ID": user,
        "HTTP_X_USER_NAME": user,
        "HTTP_X_PROJECT_ID": project,
        "HTTP_X_PROJECT_NAME": project,
        "HTTP_X_TENANT_ID": project,
        "HTTP_X_TENANT_NAME": project,
        "HTTP_X_ROLES": roles,
        "HTTP_X_ROLE": roles,
        "HTTP_X_USER_DOMAIN_ID": "default",
        "HTTP_X_PROJECT_DOMAIN_ID": "default",
        "HTTP_X_SERVICE_CATALOG": "[]",
    }


class TestBedAuth:
    """The WSGI middleware: strip client-sent identity headers, set ours, or answer 401."""

    __test__ = False

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        for key in _IDENTITY:
            environ.pop(key, None)
        ident = identity(environ.get("HTTP_X_AUTH_TOKEN", ""))
        if ident is None:
            body = b'{"error": {"code": 401, "message": "test-bed auth: token user:project"}}'
            start_response(
                "401 Unauthorized",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        environ.update(ident)
        return self.app(environ, start_response)


def filter_factory(global_conf: dict[str, Any], **local_conf: Any) -> Callable[[WSGIApp], WSGIApp]:
    """paste.deploy entry point (``paste.filter_factory = testbed.nova_auth:filter_factory``)."""
    return TestBedAuth
