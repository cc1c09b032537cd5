"""``qsnap backup ...``: the backup commands (parsers, runs, tables) of the admin CLI.

Same conventions as the snapshot commands (``cli.py``): ``-f json`` prints the API's body
as is, ``--wait`` polls the operation with progress on stderr, exit 1 when the operation
failed. A verify that found bad chunks is a failure too (exit 1, the chunks named), even
when the agent reports the operation itself as succeeded. The restore target's image format
is ``--disk-format`` because ``-f/--format`` is the output format of every command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from api_ext import _cli_output as output
from api_ext._cli_client import ApiClient

Io = tuple[TextIO, TextIO]
#: ``cli._finish(ns, client, body, io, check)``: wait if asked, print, exit status; ``check``
#: turns a succeeded operation into a failure message (or None).
Check = Callable[[Mapping[str, Any]], str | None]
Finish = Callable[[argparse.Namespace, ApiClient, dict[str, Any], Io, Check | None], int]
_SubParsers = Any  # argparse's _SubParsersAction is private


def _count(value: str) -> int:
    if not value.isdigit() or int(value) > 100000:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..100000, got {value}")
    return int(value)


def _wait_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"wait for the {what} to finish, showing progress (default: do not wait)",
    )


def add_parsers(
    top: _SubParsers,
    fmt: argparse.ArgumentParser,
    wait: argparse.ArgumentParser,
    finish: Finish,
) -> None:
    """``backup {create,list,show,verify,delete,restore,prune}`` under ``top``."""
    bk = top.add_parser("backup", help="back up, list, verify, restore and prune backups")
    cmds = bk.add_subparsers(
        dest="command",
        metavar="{create,list,show,verify,delete,restore,prune}",
        required=True,
    )
    host_help = "ask only this host's agent (default: the first known host that answers)"

    create = cmds.add_parser(
        "create",
        parents=[fmt, wait],
        help="back up volumes (listed, or all of an instance) while attached",
        description="Back up the --volume volumes (all on one host) or every volume of "
        "--instance into the repository, in parallel. Each backup reads at a checkpoint, a "
        "snapshot recorded in Cinder (qsnap-backup-checkpoint-<id>). --incremental reads only "
        "what changed since the volume's previous backup when its checkpoint still exists "
        "(else a full read with dedup; the result says why) and keeps the new checkpoint; "
        "without it the checkpoint is deleted once the backup is published.",
    )
    which = create.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--volume", action="append", dest="volumes", metavar="VOLUME_ID", help="(repeatable)"
    )
    which.add_argument("--instance", metavar="UUID", help="every volume of this instance")
    create.add_argument("--incremental", action="store_true", help="incremental backup")
    _wait_flag(create, "backup")
    create.set_defaults(
        run=lambda ns, c, io: finish(
            ns, c, c.create_backup(ns.volumes, ns.instance, ns.incremental), io, None
        )
    )

    lst = cmds.add_parser("list", parents=[fmt], help="backups in the repository, newest first")
    lst.add_argument("--volume", dest="volume_id", metavar="VOLUME_ID", help="only this volume")
    lst.add_argument("--host", help=host_help)
    lst.set_defaults(run=_list)

    show = cmds.add_parser("show", parents=[fmt], help="one backup's metadata")
    show.add_argument("backup_id", metavar="BACKUP_ID")
    show.add_argument("--host", help=host_help)
    show.set_defaults(run=_show)

    verify = cmds.add_parser(
        "verify",
        parents=[fmt, wait],
        help="check every chunk of a backup against its hash",
        description="Read and hash every chunk the backup references; with --wait, exit 1 "
        "and name the bad chunks if any is missing or corrupt.",
    )
    verify.add_argument("backup_id", metavar="BACKUP_ID")
    verify.add_argument("--host", help=host_help)
    _wait_flag(verify, "verification")
    verify.set_defaults(
        run=lambda ns, c, io: finish(
            ns, c, c.verify_backup(ns.backup_id, ns.host), io, _corrupt(ns.backup_id)
        )
    )

    delete = cmds.add_parser("delete", parents=[fmt], help="delete a backup")
    delete.add_argument("backup_id", metavar="BACKUP_ID")
    delete.add_argument("--host", help=host_help)
    delete.set_defaults(run=_delete)

    restore = cmds.add_parser(
        "restore",
        parents=[fmt, wait],
        help="restore a backup to a new file or a new volume file",
        description="Restore to --to PATH (absolute, under a share root of the agent, must "
        "not exist) or --volume V (a new file volume-V on the share), sparse, every chunk "
        "verified.",
    )
    restore.add_argument("backup_id", metavar="BACKUP_ID")
    target = restore.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", dest="to_path", metavar="PATH", help="a new file")
    target.add_argument("--volume", dest="volume_id", metavar="VOLUME_ID", help="a new volume")
    restore.add_argument(
        "--disk-format", choices=["qcow2", "raw"], default="qcow2", help="image format [qcow2]"
    )
    restore.add_argument("--host", help="restore on this host (default: the first known)")
    _wait_flag(restore, "restore")
    restore.set_defaults(run=lambda ns, c, io: finish(ns, c, _restore_body(ns, c), io, None))

    prune = cmds.add_parser(
        "prune",
        parents=[fmt, wait],
        help="delete the backups a retention rule does not keep",
        description="Per volume, keep the --keep-last newest backups and the newest backup "
        "of each of the last --keep-daily days (UTC); delete the rest, then free "
        "unreferenced chunks. A volume's newest backup is always kept. Neither option: "
        "the agent's configured default retention. Runs as an operation (cancellable with "
        "qsnap ops cancel): waits for it with progress and prints the result unless "
        "--no-wait.",
    )
    prune.add_argument("--keep-last", type=_count, metavar="N")
    prune.add_argument("--keep-daily", type=_count, metavar="D")
    prune.add_argument("--volume", dest="volume_id", metavar="VOLUME_ID", help="only this volume")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    prune.add_argument("--host", help=host_help)
    prune.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the prune to finish, showing progress (default: wait)",
    )
    prune.set_defaults(run=lambda ns, c, io: finish(ns, c, _prune_body(ns, c), io, None))


# -- commands ---------------------------------------------------------------------------
def _restore_body(ns: argparse.Namespace, client: ApiClient) -> dict[str, Any]:
    return client.restore_backup(
        ns.backup_id,
        to_path=ns.to_path,
        volume_id=ns.volume_id,
        fmt=ns.disk_format,
        host=ns.host,
    )


def _corrupt(backup_id: str) -> Check:
    """A verify that ran to the end but found bad chunks is still a failure."""

    def check(op: Mapping[str, Any]) -> str | None:
        result = op.get("result") or {}
        if result.get("ok") is not False:
            return None
        bad = ", ".join(str(c) for c in result.get("bad_chunks") or ()) or "not named"
        return f"backup {backup_id} is corrupt: bad chunks: {bad}"

    return check


def _list(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    body = client.list_backups(ns.volume_id, ns.host)
    if ns.format == "json":
        output.print_json(body, io[0])
        return 0
    rows = [
        [
            str(b.get("id")),
            str(b.get("volume_id")),
            str(b.get("created_at") or ""),
            "incremental" if b.get("incremental") else "full",
            output.human_bytes(b.get("size")),
            output.human_bytes(b.get("data_bytes")),
            str(b.get("parent") or ""),
        ]
        for b in body.get("backups") or []
    ]
    output.table(["ID", "VOLUME", "CREATED", "TYPE", "SIZE", "DATA", "PARENT"], rows, io[0])
    return 0


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _show(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    body = client.get_backup(ns.backup_id, ns.host)
    if ns.format == "json":
        output.print_json(body, io[0])
        return 0
    backup: Mapping[str, Any] = body.get("backup") or {}
    rows = [[k, _cell(v)] for k, v in sorted(backup.items()) if v is not None]
    output.table(["FIELD", "VALUE"], rows, io[0])
    return 0


def _delete(ns: argparse.Namespace, client: ApiClient, io: Io) -> int:
    client.delete_backup(ns.backup_id, ns.host)
    if ns.format == "table":  # 204: no body to print as JSON
        io[0].write(f"backup {ns.backup_id} deleted\n")
    return 0


def _prune_body(ns: argparse.Namespace, client: ApiClient) -> dict[str, Any]:
    return client.prune_backups(
        keep_last=ns.keep_last,
        keep_daily=ns.keep_daily,
        volume_id=ns.volume_id,
        dry_run=ns.dry_run,
        host=ns.host,
    )
