"""qsnap-api's oslo.config options (``[api]``) and a private ``ConfigOpts`` factory.

A private ``ConfigOpts`` (as the agent's) lets tests run several APIs in one process. The
options oslo.messaging, oslo.log, oslo.policy and keystonemiddleware read are registered on
it here or by those libraries when they are handed this ``conf``.
"""

from __future__ import annotations

from collections.abc import Sequence

from oslo_config import cfg

from hostagent.config import build_conf

api_opts: list[cfg.Opt] = [
    cfg.HostAddressOpt("bind_host", default="127.0.0.1", help="Address the API listens on."),
    cfg.PortOpt("bind_port", default=8774, help="Port the API listens on (Nova's 8774)."),
    cfg.IntOpt(
        "threads",
        default=8,
        min=1,
        max=256,
        help="HTTP worker threads. Each request blocks one thread for at most rpc_timeout.",
    ),
    cfg.StrOpt(
        "auth_strategy",
        default="keystone",
        choices=[
            ("keystone", "keystonemiddleware auth_token ([keystone_authtoken] options)"),
            (
                "noauth",
                "TESTING ONLY: identity from 'X-Auth-Token: user[:project]' and roles from "
                "X-Roles, both as the caller says; refused on a non-loopback bind_host",
            ),
        ],
        help="How requests are authenticated.",
    ),
    cfg.ListOpt(
        "noauth_roles",
        default=[],
        help="noauth only: roles given to a request that sends no X-Roles header. Cinder with "
        "'[nova] auth_type = none' sends none, nor does 'qsnap --os-auth-type none'; set "
        "'service' for Cinder, 'admin' for the CLI.",
    ),
    cfg.BoolOpt(
        "noauth_unsafe_allow_non_loopback",
        default=False,
        help="UNSAFE, never in production. noauth only: start even though bind_host is not "
        "a loopback address. Under noauth every caller that can reach the port is whoever its "
        "X-Auth-Token says and holds the roles its X-Roles header claims (admin included), so "
        "by default qsnap-api refuses to start with noauth on any address but 127.0.0.0/8, "
        "::1 or a name resolving only to those.",
    ),
    cfg.StrOpt(
        "policy_file",
        default="policy.yaml",
        help="oslo.policy overrides file (defaults live in code: assisted snapshots for "
        "'role:service or role:admin', every native /v1 call for 'role:admin').",
    ),
    cfg.IntOpt(
        "max_request_body_size",
        default=65536,
        min=1024,
        help="Largest request body in bytes; larger ones get 413 before being read.",
    ),
    cfg.IntOpt(
        "max_request_header_size",
        default=65536,
        min=4096,
        help="Largest request line plus headers in bytes (the query string, so an assisted "
        "delete's delete_info, included); larger ones get 414/413 before the app runs.",
    ),
    cfg.FloatOpt(
        "rpc_timeout",
        default=30.0,
        min=0.1,
        help="Seconds to wait for an agent's answer before answering 503.",
    ),
    cfg.ListOpt(
        "hosts",
        default=[],
        help="Static fallback: agent hosts asked (get_inventory) for a volume that no "
        "published inventory names yet. Empty: rely on the agents' fanout only.",
    ),
    cfg.FloatOpt(
        "host_ttl",
        default=180.0,
        min=1.0,
        help="Seconds after which a host whose agent has not published its inventory (nor "
        "answered an inventory probe) expires: it routes nothing and is not asked in "
        "fan-outs. Keep it a few times the agents' [agent] inventory_interval (60 s).",
    ),
    cfg.FloatOpt(
        "host_timeout",
        default=5.0,
        min=0.1,
        help="Seconds each host is given when all live hosts are asked at once for an "
        "operation (GET or cancel of /v1/operations/{id} without ?host=); a host that does "
        "not answer in time is skipped like one that does not know the operation.",
    ),
    cfg.IntOpt(
        "max_hosts",
        default=2000,
        min=1,
        help="Most agent hosts the router keeps. Past it, expired hosts are forgotten "
        "first; inventory from a further new host is ignored (a WARNING says so). Set it "
        "above the number of compute hosts.",
    ),
]


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """The ``oslo.config.opts`` entry point ``qsnap.api`` for oslo-config-generator."""
    return [("api", list(api_opts))]


def _register(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(api_opts, group="api")


def make_conf(
    args: Sequence[str] = (),
    *,
    config_files: Sequence[str] | None = None,
    overrides: dict[str, object] | None = None,
) -> cfg.ConfigOpts:
    """The API's parsed private ``ConfigOpts``; ``overrides`` maps ``"group.name"`` to a value."""
    return build_conf("qsnap-api", _register, args, config_files=config_files, overrides=overrides)
