"""P1: worst guest write stall during a quiesced snapshot, ours vs bare virsh, one run.

Why this measure: what a guest suffers from a snapshot is the time its writes block, and
qemu-ga freezes filesystems in reverse mount order, so one writer per filesystem runs and
the worst one counts. Stalls are read from the writers' own nanosecond records (guest
clock, no host/guest mapping), as the longest gap inside equal-length windows that each
contain one snapshot. A quiet window of the same length gives the writers' normal cadence.

Compared on two identical guests side by side, reps interleaved: ``take_snapshot``
(overlays made before the freeze, only the snapshotted filesystems frozen, watchdog-guarded)
vs bare ``virsh snapshot-create-as --disk-only --no-metadata --quiesce --atomic`` (libvirt
creates the overlays inside its freeze). Also printed: where our window's milliseconds go
(freeze call, hand-off, snapshot call, hand-off, thaw call).
Anchors measured here: 66 ms (1 disk), 280 ms (4 disks);
target: ours <= 0.7x virsh for 4 disks; 1 of 4 snapshotted -> other disks at normal cadence.

Run: ``.venv/bin/python -m bench.snapshot_stall [--reps N] [--share dir|gluster]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt_ops as lo
from testbed.session import TestBed

WINDOW_S = 2.0
MS = 1e6


def _window(g: Any, action: Callable[[], None]) -> tuple[int, int]:
    """Run ``action`` inside a WINDOW_S window; return the window in guest ns."""
    t_host = time.monotonic()
    t0 = g.guest_time_ns()
    action()
    time.sleep(max(0.0, WINDOW_S - (time.monotonic() - t_host)))
    return t0, g.guest_time_ns()


def _max_gaps(g: Any, t0: int, t1: int) -> dict[str, float]:
    """Longest gap (ms) per filesystem within [t0, t1]."""
    return {d.mountpoint: g.records(d.mountpoint).max_gap_ns(t0, t1) / MS for d in g.disks}


PHASES = ("freeze", "to_call", "snapshot_call", "to_thaw", "thaw", "frozen")


def _stall_interval(g: Any, mount: str, t0: int, t1: int) -> tuple[int, int]:
    """The longest gap of ``mount``'s writer inside [t0, t1] (guest ns): its freeze."""
    times = [t0, *(t for t in g.records(mount).times_ns if t0 <= t <= t1), t1]
    return max(itertools.pairwise(times), key=lambda ab: ab[1] - ab[0])


def _overlapping_gap(g: Any, mount: str, lo_ns: int, hi_ns: int) -> float:
    """Longest gap (ms) of ``mount``'s writer that overlaps [lo_ns, hi_ns]: what another
    filesystem suffered while the snapshotted one was frozen (guest clock, no mapping)."""
    t = g.records(mount).times_ns
    gaps = [b - a for a, b in itertools.pairwise(t) if b > lo_ns and a < hi_ns]
    return max(gaps, default=0) / MS


def _ours(
    g: Any, idx: list[int], roots: list[str], timings: list[lo.SnapshotTimings] | None = None
) -> Callable[[], None]:
    def run() -> None:
        specs = tuple(
            lo.DiskSnapshotSpec(
                new_file=f"volume-{g.disks[i].volume_id}.{uuid.uuid4()}",
                volume_id=g.disks[i].volume_id,
            )
            for i in idx
        )
        res = lo.take_snapshot(
            g.conn, lo.SnapshotRequest(g.uuid, specs, lo.QuiescePolicy.REQUIRE), roots=roots
        )
        if not res.quiesced or res.method is not lo.FreezeMethod.FREEZE_LIST:
            raise RuntimeError(f"not quiesced by freeze-list: {res}")
        if timings is not None:
            timings.append(res.timings)

    return run


def _virsh(g: Any) -> Callable[[], None]:
    def run() -> None:
        argv = [
            "virsh",
            "-q",
            "-c",
            g.conn.uri,
            "snapshot-create-as",
            g.name,
            "--disk-only",
            "--no-metadata",
            "--quiesce",
            "--atomic",
        ]
        for d in g.disks:
            new = Path(g.dir) / f"volume-{d.volume_id}.{uuid.uuid4()}"
            argv += ["--diskspec", f"{d.target},snapshot=external,file={new}"]
        subprocess.run(argv, check=True, capture_output=True, text=True)

    return run


def _measure_pair(bed: TestBed, ndisks: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Ours and virsh on two guests booted side by side, reps interleaved (order alternating),
    so both see the same host load: on a busy 2-core host the load drifts within a minute and
    measuring one method after the other skews the ratio either way. Two guests because
    virsh's overlays carry absolute backing paths, which our chain inspection rightly
    refuses, so the two cannot share a chain."""
    guests = {m: bed.make_guest(ndisks=ndisks) for m in ("ours", "virsh")}
    roots = [str(bed.share.root)]
    out: dict[str, dict[str, list[float]]] = {
        m: {"quiet": [], "snap": [], "others": [], "during": []} | {p: [] for p in PHASES}
        for m in guests
    }
    timings: list[lo.SnapshotTimings] = []
    try:
        for g in guests.values():
            g.start_writers(interval_ms=10, sync_every=1)
        time.sleep(1.0)
        g = guests["ours"]
        snaps = {
            "ours": _ours(g, list(range(ndisks)), roots, timings),
            "virsh": _virsh(guests["virsh"]),
        }
        for rep in range(reps):
            order = ("ours", "virsh") if rep % 2 == 0 else ("virsh", "ours")
            for m in order:
                gm = guests[m]
                out[m]["quiet"].append(max(_max_gaps(gm, *_window(gm, lambda: None)).values()))
                out[m]["snap"].append(max(_max_gaps(gm, *_window(gm, snaps[m])).values()))
            if ndisks > 1:
                t0, t1 = _window(g, _ours(g, [0], roots))
                gaps = _max_gaps(g, t0, t1)
                out["ours"]["others"].append(max(v for k, v in gaps.items() if k != "/data"))
                lo_ns, hi_ns = _stall_interval(g, "/data", t0, t1)
                others = [d.mountpoint for d in g.disks if d.mountpoint != "/data"]
                worst = max(_overlapping_gap(g, m, lo_ns, hi_ns) for m in others)
                out["ours"]["during"].append(worst)
        for gm in guests.values():
            gm.stop_writers()
        for p in PHASES:
            out["ours"][p] = [getattr(t, p) * 1000 for t in timings]
    finally:
        for gm in guests.values():
            gm.close()
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--share", default="dir", choices=["dir", "gluster"])
    args = ap.parse_args()
    with TestBed(share_kind=args.share) as bed:
        pairs = {n: _measure_pair(bed, n, args.reps) for n in (1, 4)}
    res = {(n, m): pairs[n][m] for n in (1, 4) for m in ("ours", "virsh")}
    print(
        f"P1 snapshot stall, share={args.share}, {args.reps} reps, window {WINDOW_S:.0f} s, "
        "worst writer of all filesystems, medians (ms)"
    )
    for n in (1, 4):
        ours, virsh = res[(n, "ours")], res[(n, "virsh")]
        o, v = _med(ours["snap"]), _med(virsh["snap"])
        q = _med(ours["quiet"] + virsh["quiet"])
        paired = _med([a / b for a, b in zip(ours["snap"], virsh["snap"], strict=True)])
        print(
            f"  {n} disk(s): ours {o:7.1f}  virsh --quiesce {v:7.1f}  ratio {o / v:5.2f}x  "
            f"(per-rep pairs: median {paired:4.2f}x)  "
            f"(quiet window {q:6.1f}; ours {[round(x) for x in ours['snap']]}, "
            f"virsh {[round(x) for x in virsh['snap']]})"
        )
    four = {
        "ours": res[(4, "ours")]["snap"],
        "virsh": res[(4, "virsh")]["snap"],
        "others": res[(4, "ours")]["others"],
        "quiet": res[(4, "ours")]["quiet"],
    }
    ratio4 = _med(four["ours"]) / _med(four["virsh"])
    print(
        f"  target 4 disks <= 0.70x: {'MET' if ratio4 <= 0.7 else 'MISSED'} ({ratio4:.2f}x; "
        "anchors here: virsh 66 ms / 280 ms)"
    )
    oth, q4 = _med(four["others"]), _med(four["quiet"])
    print(
        f"  1 of 4 snapshotted: other 3 filesystems' longest gap {oth:6.1f} vs normal cadence "
        f"(quiet window, same length) {q4:6.1f}  -> {oth / q4:4.2f}x "
        f"(all {[round(x) for x in four['others']]})"
    )
    during = res[(4, "ours")]["during"]
    print(
        f"    their longest gap overlapping /data's freeze: {_med(during):6.1f} "
        f"({[round(x) for x in during]})"
    )
    print("  inside our freeze window (host monotonic, medians ms; 'frozen' spans all):")
    for n in (1, 4):
        row = "  ".join(f"{p} {_med(res[(n, 'ours')][p]):6.1f}" for p in PHASES)
        print(f"    {n} disk(s): {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
