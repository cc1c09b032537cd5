"""The demo's backup steps: a full then an incremental backup of every disk while the guest
writes, each restored to a new file and judged on the records that file holds.

Both creates ask for ``incremental: true``: the first finds no previous backup, so it reads
everything (a full, kind ``full``) at its checkpoint, a snapshot the agent records like any
other (``.info`` ledger, Cinder); the second takes a new checkpoint, reads only what the
guest wrote since the first, then deletes the first. A plain create keeps no checkpoint,
and its successor could not be incremental. :func:`checkpoints_recorded` shows that the
live chain holds nothing the ledger does not name: the kept checkpoint is the ledger's
active file, the dropped one is gone from the ledger and the share.

Point in time. A restore is right when its record log is a clean prefix of the writer's
final log, holds every record the guest had made durable before the backup's snapshot, and
none stamped after the backup ended. Judged on guest CLOCK_REALTIME only, the clock the
records carry: the manifest's ``created_at`` and the journal's step times are host clock and
would need the (unknown) guest/host offset. The snapshot happens after the create request
is sent and before its operation ends, so the bracket is guest time read through qemu-ga
just before the POST (``t_req``) and just after the operation is final (``t_end``). The
writer fsyncs each record before it stamps the next one, so a record whose successor is
stamped before ``t_req`` was durable before the snapshot: all of those must be in the
restore (``must``). Records stamped after ``t_end`` cannot be.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo._stack import Http
from testbed.disks import fsck_clean, read_guest_file
from testbed.guest import Guest
from testbed.records import RecordLog, parse_records

Say = Callable[[str], None]
Judge = Callable[[str, bool, str], None]
KINDS = ("full", "incremental")
#: The incremental must read at most this share of the full's bytes to count as one.
INCREMENTAL_MAX_SHARE = 0.25
#: Data each guest filesystem gets once before the full (written, not changed again).
BULK_MIB = 16


@dataclass(frozen=True)
class Taken:
    """One volume's backup from one create request, with its guest-time bracket."""

    step: str  # "full" or "incremental": which request made it
    volume_id: str
    target: str
    backup_id: str
    kind: str  # the manifest's
    bytes_read: int
    fallback_reason: str | None
    t_req_ns: int
    t_end_ns: int
    checkpoint: str | None  # the Cinder snapshot id the backup kept (None: dropped)
    checkpoint_file: str | None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def write_bulk(g: Guest, tl: Say) -> dict[str, str]:
    """Random data the guest writes once to each filesystem before the full: the full must
    read it, the incremental must not (it takes it by reference from the full), and every
    restore must hold it. Returns its sha256 per volume, as the guest computed it."""
    t0 = time.monotonic()
    mounts = " ".join(d.mountpoint for d in g.disks)
    count = BULK_MIB * 16  # 64 KiB blocks: busybox dd takes plain numbers everywhere
    out = g.check(["/bin/sh", "-ec", f"for m in {mounts}; do dd if=/dev/urandom of=$m/bulk "
                   f"bs=65536 count={count} 2>/dev/null; sha256sum $m/bulk; done; sync"],
                  timeout=120)  # fmt: skip
    by_path = {p: h for h, p in (line.split() for line in out.decode().splitlines())}
    tl(f"guest wrote {BULK_MIB} MiB of random data to {{{mounts.replace(' ', ',')}}}/bulk in "
       f"{time.monotonic() - t0:.1f} s: the full reads it, the incremental must not")  # fmt: skip
    return {d.volume_id: by_path.get(f"{d.mountpoint}/bulk", "?") for d in g.disks}


def take_backups(http: Http, g: Guest, tl: Say, check: Judge) -> list[Taken]:
    """The full then the incremental create, through ``POST /v1/backups``, while writing."""
    targets = {d.volume_id: d.target for d in g.disks}
    taken: list[Taken] = []
    for step in KINDS:
        t_req = g.guest_time_ns()
        status, body = http.call(
            "POST", "/v1/backups", {"backup": {"instance_uuid": g.uuid, "incremental": True}}
        )
        if status != 202:
            check(f"{step} backup accepted", False, f"HTTP {status}: {body}")
            return taken
        op = body["operation"]
        tl(f"POST /v1/backups (instance {g.uuid[:8]}..., incremental: true) -> 202, "
           f"operation {op['id'][:8]} [{step}]")  # fmt: skip
        op = http.wait(op)
        t_end = g.guest_time_ns()
        got: list[Taken] = []
        for r in (op.get("result") or {}).get("backups") or []:
            _, found = http.call("GET", f"/v1/backups/{r['backup_id']}")
            m = found.get("backup") or {}
            vid, bid = r["volume_id"], r["backup_id"]
            kind, why = str(m.get("kind")), r.get("fallback_reason")
            target = targets.get(vid, "?")
            cp, cp_file = r.get("checkpoint"), r.get("checkpoint_file")
            got.append(
                Taken(step, vid, target, bid, kind, int(r["bytes_read"]), why, t_req, t_end,
                      cp, cp_file)
            )  # fmt: skip
        for t in got:
            why = f" ({t.fallback_reason})" if t.fallback_reason else ""
            tl(f"    {t.target}: backup {t.backup_id[:8]} kind {t.kind}, read "
               f"{_mib(t.bytes_read)}{why}")  # fmt: skip
        check(
            f"{step} backup of all disks",
            op["state"] == "succeeded"
            and len(got) == len(g.disks)
            and all(t.kind == step for t in got),
            f"{op['state']}, {len(got)} backups of kind {sorted({t.kind for t in got})}, "
            f"{_mib(sum(t.bytes_read for t in got))} read"
            + (f", error {op['error']}" if op.get("error") else ""),
        )
        taken += got
        if op["state"] != "succeeded":
            return taken
        if step == "full":
            time.sleep(1.0)  # records for the incremental to carry
    full = sum(t.bytes_read for t in taken if t.step == "full")
    incr = sum(t.bytes_read for t in taken if t.step == "incremental")
    check(
        "the incremental reads far fewer bytes",
        0 < incr <= INCREMENTAL_MAX_SHARE * full,
        f"full read {_mib(full)} ({full} bytes), incremental {_mib(incr)} ({incr} bytes): "
        f"{full / max(incr, 1):.1f}x less",
    )
    return taken


def synced_before(log: RecordLog, t_ns: int) -> int:
    """Records proven durable before guest time ``t_ns``: those whose successor was stamped
    before it (the writer stamps a record only after the previous one's fsync returned)."""
    return sum(1 for t in log.times_ns[1:] if t < t_ns)


def restore_and_check(
    http: Http,
    taken: list[Taken],
    final: dict[str, RecordLog],
    bulk: dict[str, str],
    restore_dir: Path,
    tl: Say,
    check: Judge,
) -> None:
    """Restore every backup to a new qcow2 under ``restore_dir`` (all queued, then awaited)
    and judge each against the writer's final log ``final[volume_id]`` and the bulk file's
    sha256 ``bulk[volume_id]``."""
    queued: list[tuple[Taken, Path, dict[str, Any]]] = []
    for t in taken:
        path = restore_dir / f"{t.target}-{t.step}-{t.backup_id[:8]}.qcow2"
        status, body = http.call(
            "POST",
            f"/v1/backups/{t.backup_id}/restore",
            {"restore": {"to_path": str(path), "format": "qcow2"}},
        )
        if status != 202:
            check(f"{t.target} {t.step} restore", False, f"HTTP {status}: {body}")
            continue
        queued.append((t, path, body["operation"]))
    if queued:
        tl(f"POST /v1/backups/{{id}}/restore x{len(queued)} -> 202: each to a new file in "
           f"{restore_dir}")  # fmt: skip
    for t, path, op in queued:
        op = http.wait(op)
        name = f"{t.target} {t.step} restore"
        if op["state"] != "succeeded" or not path.is_file():
            check(name, False, f"{op['state']}, error {op.get('error')}")
            continue
        fs = fsck_clean(path, "qcow2")
        log = parse_records(read_guest_file(path, "qcow2", "/records"))
        ref = final[t.volume_id]
        must = synced_before(ref, t.t_req_ns)
        late = sum(1 for ts in log.times_ns if ts > t.t_end_ns)
        held = hashlib.sha256(read_guest_file(path, "qcow2", "/bulk")).hexdigest()
        bulk_ok = held == bulk.get(t.volume_id)
        check(
            name,
            fs.ok
            and not fs.needs_recovery
            and log.clean
            and log.is_prefix_of(ref)
            and log.count >= must
            and late == 0
            and bulk_ok,
            f"{path.name}: fsck {'clean' if fs.ok else 'ERRORS'}, journal "
            f"{'needs recovery' if fs.needs_recovery else 'clean'}, {log.count} records, "
            f"prefix of the {ref.count} written: {log.is_prefix_of(ref)}, "
            f">= {must} synced before the request: {log.count >= must}, "
            f"{late} stamped after it ended, /bulk sha256 as in the guest: {bulk_ok}"
            + ("" if log.clean else ": " + "; ".join(log.problems)),
        )


@dataclass(frozen=True)
class Ledger:
    """Cinder's ``volume-<id>.info`` as the demo reads it: the active file, id -> file."""

    active: str
    snapshots: dict[str, str]


def read_ledger(directory: Path, volume_id: str) -> Ledger | None:
    p = directory / f"volume-{volume_id}.info"
    if not p.exists():
        return None
    doc = json.loads(p.read_text())
    return Ledger(str(doc["active"]), {k: str(v) for k, v in doc.items() if k != "active"})


def checkpoints_recorded(g: Guest, taken: list[Taken], tl: Say, check: Judge) -> None:
    """Each disk's live top is the incremental's checkpoint and the ledger's active file; the
    full's checkpoint is gone from the ledger and the share; every layer is in the ledger."""
    for d in g.disks:
        mine = {t.step: t for t in taken if t.volume_id == d.volume_id}
        inc, full = mine.get("incremental"), mine.get("full")
        ledger = read_ledger(d.path.parent, d.volume_id)
        chain = g.chain(d.volume_id)
        if ledger is None or inc is None or full is None:
            check(f"{d.target} checkpoints recorded", False, f"no ledger or backups: {chain}")
            continue
        known = {*ledger.snapshots.values(), d.path.name}
        kept = ledger.active == chain[0] == ledger.snapshots.get(inc.checkpoint or "")
        gone = full.checkpoint not in ledger.snapshots
        gone = gone and not (d.path.parent / (full.checkpoint_file or "-")).exists()
        tl(f"    {d.target}: chain {' <- '.join(n[-8:] for n in chain)}; ledger active "
           f"...{ledger.active[-8:]}, {len(ledger.snapshots)} snapshot(s)")  # fmt: skip
        check(
            f"{d.target} checkpoints recorded",
            kept and gone and set(chain) <= known,
            f"live top is the ledger's active and the incremental's checkpoint: {kept}; "
            f"the full's checkpoint deleted: {gone}; every layer in the ledger: "
            f"{set(chain) <= known}",
        )
