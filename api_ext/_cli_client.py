"""The ``qsnap`` CLI's HTTP side: OpenStack auth options, a keystoneauth1 session, /v1 calls.

Auth follows the other OpenStack CLIs (keystoneauth1 ``loading``): ``--os-auth-type`` (default
``password``, or ``OS_AUTH_TYPE``) and that plugin's ``--os-*`` options and ``OS_*`` variables.
The endpoint is the catalog's ``qsnap`` service unless ``--os-endpoint`` / ``QSNAP_URL``
overrides it; ``--os-auth-type none`` (noauth deployments, the demo) has no catalog, so it
needs one. Every call returns the API's JSON body as is, so ``--format json`` prints exactly
what the API said.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote, urlencode

from keystoneauth1 import adapter, exceptions, loading

SERVICE_TYPE = "qsnap"
DEFAULT_AUTH_TYPE = "password"
_PASSWORD_PLUGINS = ("password", "v3password", "v2password")


class UsageError(Exception):
    """The options cannot make a client (exit 2, like argparse's own errors)."""


class ApiError(Exception):
    """The API refused or failed a request; ``message`` is the API's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No HTTP answer: connection refused, timeout, no endpoint, auth service down."""


def register_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Session options, ``--os-auth-type`` with its plugin's options, endpoint selection."""
    loading.register_session_argparse_arguments(parser)
    loading.register_auth_argparse_arguments(parser, argv, default=DEFAULT_AUTH_TYPE)
    group = parser.add_argument_group("qsnap endpoint")
    if "--os-endpoint" not in parser._option_string_actions:  # auth type 'none' adds it
        group.add_argument(
            "--os-endpoint",
            dest="os_endpoint",
            metavar="<url>",
            default=None,
            help="qsnap-api URL, bypassing the catalog. Defaults to env[QSNAP_URL].",
        )
    group.add_argument(
        "--os-interface",
        metavar="<interface>",
        default=os.environ.get("OS_INTERFACE", "public"),
        help="Catalog interface of the qsnap endpoint. Defaults to env[OS_INTERFACE] or public.",
    )
    group.add_argument(
        "--os-region-name",
        metavar="<region>",
        default=os.environ.get("OS_REGION_NAME"),
        help="Catalog region of the qsnap endpoint. Defaults to env[OS_REGION_NAME].",
    )


def _endpoint(ns: argparse.Namespace) -> str | None:
    value = getattr(ns, "os_endpoint", None) or os.environ.get("QSNAP_URL")
    return str(value).rstrip("/") if value else None


def make_client(ns: argparse.Namespace) -> ApiClient:
    """The client the parsed options describe; raises UsageError when they cannot."""
    endpoint = _endpoint(ns)
    if str(ns.os_auth_type) == "none":
        if not endpoint:
            raise UsageError("--os-auth-type none needs --os-endpoint (or QSNAP_URL)")
        ns.os_endpoint = endpoint  # the 'none' plugin's own option
    if str(ns.os_auth_type) in _PASSWORD_PLUGINS:
        # the password plugins load without these and fail only at the first request
        missing = [
            name
            for name, value in (
                ("--os-username (or --os-user-id)", ns.os_username or ns.os_user_id),
                ("--os-password", ns.os_password),
            )
            if not value
        ]
        if missing:
            raise UsageError(f"authentication needs {', '.join(missing)} (or OS_* variables)")
    try:
        auth = loading.load_auth_from_argparse_arguments(ns)
    except exceptions.MissingRequiredOptions as exc:
        names = ", ".join("--os-" + o.dest.replace("_", "-") for o in exc.options)
        raise UsageError(f"authentication needs {names} (or the OS_* variables)") from None
    except exceptions.NoMatchingPlugin as exc:
        raise UsageError(str(exc)) from None
    sess = loading.load_session_from_argparse_arguments(ns, auth=auth)
    return ApiClient(
        adapter.Adapter(
            sess,
            service_type=SERVICE_TYPE,
            interface=ns.os_interface,
            region_name=ns.os_region_name,
            endpoint_override=endpoint,
            user_agent="qsnap-cli",
            raise_exc=False,
        )
    )


def _message(resp: Any) -> str:
    """The API's fault message (``{"itemNotFound": {"code", "message"}}``) or the raw text."""
    try:
        body = resp.json()
    except ValueError:
        return str(resp.text).strip()[:500] or str(resp.reason or "no message")
    if isinstance(body, dict) and len(body) == 1:
        (fault,) = body.values()
        if isinstance(fault, dict) and "message" in fault:
            return str(fault["message"])
    return str(resp.text).strip()[:500]


class ApiClient:
    """The native /v1 API; each method returns the decoded JSON body."""

    def __init__(self, http: adapter.Adapter) -> None:
        self._http = http

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": {"Accept": "application/json"}}
        if body is not None:
            kwargs["json"] = body
        try:
            resp = self._http.request(path, method, **kwargs)
        except exceptions.EndpointNotFound:
            raise Unreachable(
                f"no '{SERVICE_TYPE}' endpoint in the catalog; use --os-endpoint or QSNAP_URL"
            ) from None
        except exceptions.ConnectionError as exc:
            raise Unreachable(f"cannot reach the qsnap API: {exc}") from None
        except exceptions.HttpError as exc:  # raised by auth plugins talking to Keystone
            raise ApiError(exc.http_status or 0, f"authentication failed: {exc.message}") from None
        except exceptions.ClientException as exc:  # discovery, bad auth URL, ...
            raise Unreachable(f"cannot use the identity service: {exc}") from None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _message(resp))
        if resp.status_code == 204:
            return {}
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(resp.status_code, "the API answered with a non-JSON body") from None
        if not isinstance(data, dict):
            raise ApiError(resp.status_code, "the API answered with an unexpected body")
        return data

    def snapshot_instance(
        self, instance_uuid: str, volume_ids: list[str] | None, quiesce: str
    ) -> dict[str, Any]:
        snapshot: dict[str, Any] = {"quiesce": quiesce}
        if volume_ids:
            snapshot["volume_ids"] = volume_ids
        path = f"/v1/instances/{quote(instance_uuid, safe='')}/snapshots"
        return self._call("POST", path, {"snapshot": snapshot})

    def delete_snapshot(self, volume_id: str, snapshot_id: str) -> dict[str, Any]:
        path = f"/v1/volumes/{quote(volume_id, safe='')}/snapshots/{quote(snapshot_id, safe='')}"
        return self._call("DELETE", path)

    def get_operation(self, op_id: str, host: str | None = None) -> dict[str, Any]:
        path = f"/v1/operations/{quote(op_id, safe='')}"
        if host:
            path += "?" + urlencode({"host": host})
        return self._call("GET", path)

    def cancel_operation(self, op_id: str, host: str | None = None) -> dict[str, Any]:
        path = f"/v1/operations/{quote(op_id, safe='')}/cancel"
        if host:
            path += "?" + urlencode({"host": host})
        return self._call("POST", path)

    def list_operations(self, **filters: object) -> dict[str, Any]:
        query = {k: str(v) for k, v in filters.items() if v is not None}
        return self._call("GET", "/v1/operations" + ("?" + urlencode(query) if query else ""))

    # -- backups ----------------------------------------------------------------------------
    @staticmethod
    def _backup_path(backup_id: str, suffix: str = "", host: str | None = None) -> str:
        path = f"/v1/backups/{quote(backup_id, safe='')}{suffix}"
        return path + ("?" + urlencode({"host": host}) if host else "")

    def create_backup(
        self, volume_ids: list[str] | None, instance_uuid: str | None, incremental: bool
    ) -> dict[str, Any]:
        backup: dict[str, Any] = {"incremental": incremental}
        if volume_ids:
            backup["volume_ids"] = volume_ids
        if instance_uuid:
            backup["instance_uuid"] = instance_uuid
        return self._call("POST", "/v1/backups", {"backup": backup})

    def list_backups(self, volume_id: str | None, host: str | None) -> dict[str, Any]:
        query = {k: v for k, v in (("volume_id", volume_id), ("host", host)) if v}
        return self._call("GET", "/v1/backups" + ("?" + urlencode(query) if query else ""))

    def get_backup(self, backup_id: str, host: str | None = None) -> dict[str, Any]:
        return self._call("GET", self._backup_path(backup_id, host=host))

    def verify_backup(self, backup_id: str, host: str | None = None) -> dict[str, Any]:
        return self._call("POST", self._backup_path(backup_id, "/verify", host))

    def delete_backup(self, backup_id: str, host: str | None = None) -> dict[str, Any]:
        return self._call("DELETE", self._backup_path(backup_id, host=host))

    def restore_backup(
        self,
        backup_id: str,
        *,
        to_path: str | None,
        volume_id: str | None,
        fmt: str,
        host: str | None,
    ) -> dict[str, Any]:
        restore: dict[str, Any] = {"format": fmt}
        if to_path is not None:
            restore["to_path"] = to_path
        if volume_id is not None:
            restore["volume_id"] = volume_id
        body: dict[str, Any] = {"restore": restore}
        if host:
            body["host"] = host
        return self._call("POST", self._backup_path(backup_id, "/restore"), body)

    def prune_backups(
        self,
        *,
        keep_last: int | None,
        keep_daily: int | None,
        volume_id: str | None,
        dry_run: bool,
        host: str | None,
    ) -> dict[str, Any]:
        prune: dict[str, Any] = {"dry_run": dry_run}
        for key, value in (
            ("keep_last", keep_last),
            ("keep_daily", keep_daily),
            ("volume_id", volume_id),
        ):
            if value is not None:
                prune[key] = value
        body: dict[str, Any] = {"prune": prune}
        if host:
            body["host"] = host
        return self._call("POST", "/v1/backups/prune", body)
