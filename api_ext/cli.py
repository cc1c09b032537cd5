"""``qsnap``: the admin CLI over qsnap-api's native /v1 API.

Exit status: 0 success; 1 the operation failed or was cancelled, the API refused the request
(its message is printed), the API could not be reached, or ``--wait-timeout`` passed while
waiting; 2 usage errors; 130 Ctrl-C while waiting (the operation goes on: the command that
cancels it is printed; nothing is cancelled implicitly).
Results go to stdout (a table, or with ``--format json`` exactly the API's JSON body);
progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from keystoneauth1 import exceptions as ks_exceptions

from api_ext import _cli_backup
from api_ext import _cli_output as output
from api_ext._cli_client import ApiClient, ApiError, Unreachable, UsageError, make_client
from api_ext._cli_client import register_options as register_auth_options
from hostagent.rpc import contract as api

#: CLI quiesce words -> the API's values.
QUIESCE = {"require": "required", "prefer": "preferred", "off": "none"}
EPILOG = (
    "Authentication: the usual OpenStack --os-* options and OS_* variables (keystoneauth1); "
    "the endpoint is the catalog's 'qsnap' service unless --os-endpoint or QSNAP_URL is "
    "given. For a noauth qsnap-api: --os-auth-type none --os-endpoint URL. "
    "Exit status: 0 success, 1 failure (operation failed, API error, unreachable, wait "
    "timeout), 2 usage error."
)


class WaitTimeout(Exception):
    pass


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..1000, got {value}")
    return int(value)


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument(
        "-f",
        "--format",
        choices=["table", "json"],
        default="table",
        help="table (default) or json: the API's response body as is, for scripts",
    )
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--wait-timeout",
        type=_positive,
        default=3600.0,
        metavar="SECONDS",
        help="give up waiting after this long (exit 1; the operation goes on) [3600]",
    )
    wait.add_argument(
        "--poll-interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="seconds between status polls while waiting [1]",
    )
    return fmt, wait


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsnap",
        description="qsnap admin CLI: snapshot instances' volumes, delete agent-managed "
        "snapshots, back up and restore volumes and follow operations through qsnap-api's "
        "native /v1 API.",
        epilog=EPILOG,
    )
    register_auth_options(parser, argv)
    fmt, wait = _parents()
    top = parser.add_subparsers(dest="area", metavar="{snapshot,backup,ops}", required=True)

    snap = top.add_parser("snapshot", help="create or delete snapshots")
    snap_cmds = snap.add_subparsers(dest="command", metavar="{create,delete}", required=True)
    create = snap_cmds.add_parser(
        "create",
        parents=[fmt, wait],
        help="snapshot all (or the listed) volumes of an instance in one freeze",
        description="Snapshot all volumes of an instance, or the --volume ones, at one "
        "point in time (one atomic libvirt snapshot). Waits for the result unless --no-wait.",
    )
    create.add_argument("--instance", required=True, metavar="UUID", help="the instance")
    create.add_argument(
        "--volume",
        action="append",
        dest="volumes",
        metavar="VOLUME_ID",
        help="snapshot only this volume (repeatable); default: every volume disk",
    )
    create.add_argument(
        "--quiesce",
        choices=list(QUIESCE),
        default="prefer",
        help="require: fail unless the guest agent froze the filesystems; prefer (default): "
        "freeze if possible, else crash-consistent; off: never freeze",
    )
    create.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the operation to finish, showing progress (default: wait)",
    )
    create.set_defaults(run=_snapshot_create)

    delete = snap_cmds.add_parser(
        "delete",
        parents=[fmt, wait],
        help="delete a snapshot the agent manages (merge it away)",
        description="Delete one snapshot of a volume: the agent merges its file away and "
        "updates the volume's ledger. Returns once accepted unless --wait.",
    )
    delete.add_argument("--volume", required=True, metavar="VOLUME_ID", help="its volume")
    delete.add_argument("snapshot_id", metavar="SNAPSHOT_ID", help="the snapshot to delete")
    delete.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="wait for the merge to finish, showing progress (default: do not wait)",
    )
    delete.set_defaults(run=_snapshot_delete)

    _cli_backup.add_parsers(top, fmt, wait, _finish)

    ops = top.add_parser("ops", help="list, show or cancel operations")
    ops_cmds = ops.add_subparsers(dest="command", metavar="{list,show,cancel}", required=True)
    lst = ops_cmds.add_parser(
        "list",
        parents=[fmt],
        help="operations of every known host, newest first",
        description="Operations of every known host (or --host), newest first. Hosts that "
        "did not answer are named on stderr.",
    )
    lst.add_argument("--host", help="only this host's agent")
    lst.add_argument("--state", choices=[s.value for s in api.OperationState])
    lst.add_argument("--kind", choices=[k.value for k in api.OperationKind])
    lst.add_argument("--volume", dest="volume_id", metavar="VOLUME_ID")
    lst.add_argument("--limit", type=_limit, default=None, help="at most N (1..1000) [100]")
    lst.set_defaults(run=_ops_list)

    show = ops_cmds.add_parser("show", parents=[fmt], help="one operation's details")
    show.add_argument("op_id", metavar="OP_ID")
    show.add_argument("--host", help="ask only this host's agent (default: every host)")
    show.set_defaults(run=_ops_show)

    cancel = ops_cmds.add_parser(
        "cancel",
        parents=[fmt, wait],
        help="cancel a running backup, verify, prune or restore",
        description="Ask the operation's agent to stop it at its next chunk; it then ends "
        "'cancelled' (backups already published stay published, nothing partial is "
        "published). Snapshot operations are not cancellable (HTTP 409), nor is an operation "
        "that already ended. Exit 0: the cancel was accepted (without --wait), or the "
        "operation ended cancelled (--wait); exit 1: refused, or with --wait it ended "
        "succeeded/failed before it noticed the cancel.",
    )
    cancel.add_argument("op_id", metavar="OP_ID")
    cancel.add_argument("--host", help="the operation's host (default: every host is asked)")
    cancel.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="follow the operation to its end (default: return once accepted)",
    )
    cancel.set_defaults(run=_ops_cancel)
    return parser


# -- commands ---------------------------------------------------------------------------
Io = tuple[TextIO, TextIO]


def _emit_operation(ns: argparse.Namespace, body: dict[str, Any], out: TextIO) -> None:
    if ns.format == "json":
        output.print_json(body, out)
    else:
        output.print_operation(body, out)


def _finish(
    ns: argparse.Namespace,
    client: ApiClient,
    body: dict[str, Any],
    io: Io,
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> int:
    """Wait if asked, print the operation; 1 if it failed (or ``check`` names a problem)."""
    out, err = io
    if ns.wait:
        try:
            body = _wait(ns, client, body, err)
        except KeyboardInterrupt:
            return _interrupted(body["operation"], err)
    _emit_operation(ns, body, out)
    op = body["operation"]
    if op["state"] in ("failed", "cancelled"):
        error = op.get("error") or {}
        why = error.get("message") or "no error"
        err.write(f"qsnap: operation {op['id']} {op['state']}: {why}\n")
        return 1
    problem = check(op) if check is not None and op["state"] == "succeeded" else None
    if problem:
        err.write(f"qsnap: {problem}\n")
        return 1
    return 0


def _wait(
    ns: argparse.Namespace, client: ApiClient, body: dict[str, Any], err: TextIO
) -> dict[str, Any]:
    reporter = output.ProgressReporter(err)
    try:
        return wait_for(client, body, ns.poll_interval, ns.wait_timeout, reporter)
    finally:
        reporter.close()


#: Operation kinds ``qsnap ops cancel`` can stop (the agent refuses the others).
CANCELLABLE = ("backup", "restore")


def _interrupted(op: Mapping[str, Any], err: TextIO) -> int:
    """Ctrl-C while waiting: the operation goes on; say how to follow or cancel it."""
    op_id = op["id"]
    err.write(f"\nqsnap: stopped waiting; operation {op_id} goes on (qsnap ops show {op_id})\n")
    if op.get("kind") in CANCELLABLE:
        err.write(f"qsnap: to cancel it: qsnap ops cancel {op_id}\n")
    err.flush()
    return 130


def _ops_cancel(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    out, err = io
    body = client.cancel_operation(ns.op_id, ns.host)
    if ns.wait:
        try:
            body = _wait(ns, client, body, err)
        except KeyboardInterrupt:
            return _interrupted(body["operation"], err)
    _emit_operation(ns, body, out)
    op = body["operation"]
    if ns.wait and op["state"] != "cancelled":
        err.write(f"qsnap: operation {op['id']} ended {op['state']} before it was cancelled\n")
        return 1
    return 0


def _snapshot_create(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    body = client.snapshot_instance(ns.instance, ns.volumes, QUIESCE[ns.quiesce])
    return _finish(ns, client, body, io)


def _snapshot_delete(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    return _finish(ns, client, client.delete_snapshot(ns.volume, ns.snapshot_id), io)


def _ops_list(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    out, err = io
    body = client.list_operations(
        host=ns.host, state=ns.state, kind=ns.kind, volume_id=ns.volume_id, limit=ns.limit
    )
    if ns.format == "json":
        output.print_json(body, out)
    else:
        output.print_operations(body, out, err)
    return 0


def _ops_show(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    _emit_operation(ns, client.get_operation(ns.op_id, ns.host), io[0])
    return 0


def wait_for(
    client: ApiClient,
    body: dict[str, Any],
    interval: float,
    timeout: float,
    reporter: output.ProgressReporter,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the operation (on its own host) until final; transient 503s/unreachable retried."""
    deadline = clock() + timeout
    op = body["operation"]
    while True:
        reporter.update(op)
        if op["state"] in output.FINAL_STATES:
            return body
        if clock() >= deadline:
            raise WaitTimeout(
                f"operation {op['id']} still {op['state']} after {timeout:g} s; "
                f"follow it with: qsnap ops show {op['id']}"
            )
        sleep(interval)
        try:
            body = client.get_operation(str(op["id"]), str(op["host"]))
        except (ApiError, Unreachable) as exc:
            if isinstance(exc, ApiError) and exc.status != 503:
                raise
            reporter.note(f"qsnap: polling {op['id']}: {exc} (retrying)")
            continue
        op = body["operation"]


def main(
    argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        parser = build_parser(args)
    except ks_exceptions.NoMatchingPlugin as exc:
        err.write(f"qsnap: error: {exc}\n")
        return 2
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        client = make_client(ns)
    except UsageError as exc:
        parser.print_usage(err)
        err.write(f"qsnap: error: {exc}\n")
        return 2
    try:
        rc: int = ns.run(ns, client, (out, err))
    except ApiError as exc:
        err.write(f"qsnap: error: {exc}\n")
        return 1
    except (Unreachable, WaitTimeout) as exc:
        err.write(f"qsnap: error: {exc}\n")
        return 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
