"""Bench (issue 4): assisted snapshot creates per second, 10 volumes at once vs one at a time.

A real ``qsnap-agent`` process on a private RabbitMQ node, two TCG guests with 5 small qcow2
volumes each (``volume-<uuid>``, serial = uuid) on a dir share, a CinderRecorder standing in
for Cinder's status API. Every request is Cinder's: the overlay is pre-created with a
relative backing name onto the previous file of that volume, 5 per volume, 50 in all.

- baseline: the 50 requests strictly one after another (each waits for its ``creating/90%``);
- streams: 10 clients at once, one per volume, each sending its next request as soon as the
  previous one reported done (what Cinder does: it holds the volume while a snapshot runs);
- burst: all 50 sent at once, each volume's in chain order, without waiting; counts what
  the agent accepts (a create is validated at accept time against the LIVE chain, so one
  whose overlay backs onto a not-yet-taken snapshot is refused; nothing is touched then).

Done = the recorder received the report (no polling load on the agent); every operation is
then read back with ``get_operation`` (SUCCEEDED) and every chain checked against the
expected files. Prints ops/s, accept latency median/p95, the ratio streams/baseline, the
journal's per-step times, how snapshots of one guest overlapped and how many were quiesced,
and the fixed cost of the thaw-watchdog process each quiesced snapshot starts.

Run: ``PYTHONPATH=. .venv/bin/python bench/ops_concurrency.py [--workers 4]``
"""

from __future__ import annotations

import argparse
import collections
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CTX = {"request_id": "req-bench"}


class Reports(list[tuple[str, dict[str, Any]]]):
    """The recorder's list of reports, waking waiters on every append."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def append(self, item: tuple[str, dict[str, Any]]) -> None:
        with self.cond:
            super().append(item)
            self.cond.notify_all()

    def wait_for(self, sid: str, timeout: float = 300.0) -> dict[str, Any]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(s == sid for s, _ in self), timeout)
            if not ok:
                raise TimeoutError(f"no report for snapshot {sid} in {timeout} s")
            return next(b for s, b in self if s == sid)


@dataclass
class Volume:
    guest: Any
    vol: str
    directory: Path
    target: str
    files: list[str] = field(default_factory=list)  # top first, as the chain should be


@dataclass
class Req:
    volume: Volume
    sid: str
    new_file: str
    accept_s: float = 0.0
    op_id: str = ""
    refused: str = ""


def live_chain(v: Volume) -> list[str]:
    from libvirt_ops import find_disk

    return [os.path.basename(x.path) for x in find_disk(v.guest.dom, volume_id=v.vol).chain]


def precreate(vols: list[Volume], per_volume: int) -> list[list[Req]]:
    """Cinder's overlays for one phase, chained per volume; returns requests per volume."""
    out: list[list[Req]] = []
    for v in vols:
        top, reqs = v.files[0], []
        for _ in range(per_volume):
            sid = str(uuid.uuid4())
            name = f"volume-{v.vol}.{sid}"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    top,
                    str(v.directory / name),
                ],
                check=True,
            )
            reqs.append(Req(v, sid, name))
            top = name
        out.append(reqs)
    return out


def submit(client: Any, r: Req) -> None:
    from hostagent.rpc import contract as api

    info = {"snapshot_id": r.sid, "type": "qcow2", "new_file": r.new_file}
    t0 = time.perf_counter()
    try:
        op = client.create_assisted_snapshot(CTX, r.volume.vol, info)
    except api.InvalidRequest as exc:
        r.refused = str(exc)
        return
    finally:
        r.accept_s = time.perf_counter() - t0
    r.op_id = op.id


def run_chain(client: Any, reports: Reports, reqs: list[Req], wait_each: bool) -> None:
    for r in reqs:
        submit(client, r)
        if r.refused:
            return  # later ones back onto this one: they cannot be taken either
        if wait_each:
            reports.wait_for(r.sid)


def serially(client: Any, reports: Reports, reqs: list[Req]) -> None:
    for r in reqs:
        run_chain(client, reports, [r], wait_each=True)


def phase(name: str, clients: list[Any], reports: Reports, per_vol: list[list[Req]]) -> float:
    """Run one phase; returns its wall time from the first send to the last report.

    baseline: all requests one at a time; streams: one client per volume; guest-streams:
    one client per guest (its volumes round-robin), i.e. one operation per guest at a time;
    burst: everything sent at once without waiting.
    """
    t0 = time.perf_counter()
    jobs: list[tuple[Any, ...]] = []
    if name == "baseline":
        serially(clients[0], reports, [r for rnd in zip(*per_vol, strict=True) for r in rnd])
    elif name == "guest-streams":
        by_guest: dict[str, list[list[Req]]] = collections.defaultdict(list)
        for reqs in per_vol:
            by_guest[reqs[0].volume.guest.uuid].append(reqs)
        for i, chains in enumerate(by_guest.values()):
            order = [r for rnd in zip(*chains, strict=True) for r in rnd]
            jobs.append((serially, clients[i], reports, order))
    else:
        for i, reqs in enumerate(per_vol):
            jobs.append((run_chain, clients[i], reports, reqs, name == "streams"))
    threads = [threading.Thread(target=j[0], args=j[1:]) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in (r for reqs in per_vol for r in reqs if r.op_id):
        reports.wait_for(r.sid)
    return time.perf_counter() - t0


def verify(client: Any, reports: Reports, per_vol: list[list[Req]]) -> tuple[list[Any], list[str]]:
    """Succeeded ops reported creating/90% and are live; failed ones reported error.

    Returns (succeeded operations, one line per failed one saying whether its overlay is
    nevertheless the live chain's). Chains must hold exactly the files of taken snapshots.
    """
    from hostagent.rpc import contract as api

    ok: list[Any] = []
    bad: list[str] = []
    for reqs in per_vol:
        v = reqs[0].volume
        live = live_chain(v)
        for r in reqs:
            taken = r.new_file in live
            if not r.op_id:
                assert not taken
                os.unlink(v.directory / r.new_file)  # refused: Cinder would remove it
                continue
            op = client.get_operation(CTX, r.op_id)
            body = reports.wait_for(r.sid)
            if op.state is api.OperationState.SUCCEEDED:
                assert taken and body == {"status": "creating", "progress": "90%"}, (r, body)
                ok.append(op)
                continue
            assert op.state is api.OperationState.FAILED and body == {"status": "error"}, op
            err = op.error or {}
            bad.append(
                f"{err.get('code')}: {str(err.get('message'))[:80]} -> Cinder told 'error', "
                f"overlay {'IS the live top (snapshot taken!)' if taken else 'not in chain'}"
            )
            if not taken:
                os.unlink(v.directory / r.new_file)
        mine = {r.new_file for r in reqs}
        assert live[len(live) - len(v.files) :] == v.files, (live, v.files)
        assert set(live[: len(live) - len(v.files)]) <= mine, live
        v.files = live
    return ok, bad


def q(xs: list[float], p: float) -> float:
    return sorted(xs)[round(p * (len(xs) - 1))]


def step_times(journal: Path, op_ids: list[str]) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every step of these operations, from the agent's own journal."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    wanted = set(op_ids)
    out: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    rows = db.execute("SELECT op_id, name, created_at, updated_at FROM steps").fetchall()
    ops = db.execute("SELECT id, created_at, updated_at FROM operations").fetchall()
    db.close()
    rows = [r for r in rows if r[0] in wanted]
    ops = [o for o in ops if o[0] in wanted]
    for _op, name, a, b in rows:
        out[name].append((a, b))
    out["whole operation"] = [(a, b) for _i, a, b in ops]
    return out


def overlaps(intervals: list[tuple[float, float]]) -> int:
    """How many intervals start while another one of the list is still open."""
    s = sorted(intervals)
    n, end = 0, float("-inf")
    for a, b in s:
        if a < end:
            n += 1
        end = max(end, b)
    return n


def report(
    name: str, wall: float, per_vol: list[list[Req]], ops: list[Any], bad: list[str], jpath: Path
) -> None:
    reqs = [r for reqs in per_vol for r in reqs]
    acc = [r.accept_s * 1000 for r in reqs if r.op_id]
    refused = [r for r in reqs if r.refused]
    unsent = len(reqs) - len(acc) - len(refused)
    print(
        f"\n== {name}: {len(acc)} accepted, {len(refused)} refused, {unsent} not sent "
        f"(behind a refused one), wall {wall:.2f} s"
    )
    if refused:
        print(f"   refused, e.g.: {refused[0].refused[:160]}")
    if bad:
        print(f"   FAILED {len(bad)}:")
        for line, n in collections.Counter(bad).items():
            print(f"     {n}x {line}")
    print(
        f"   completed/s {len(acc) / wall:.2f}, succeeded/s {len(ops) / wall:.2f}; "
        f"accept latency median {statistics.median(acc):.1f} ms, "
        f"p95 {q(acc, 0.95):.1f} ms"
    )
    if not ops:
        return
    steps = step_times(jpath, [o.id for o in ops])
    parts = ", ".join(
        f"{k} {statistics.median(b - a for a, b in v) * 1000:.0f}" for k, v in steps.items()
    )
    print(f"   journal medians (ms): {parts}")
    snap = {o.id: s for o in ops for s in o.result["steps"] if s["name"] == "snapshot"}
    quiesced = sum(bool(s["data"].get("quiesced")) for s in snap.values())
    reasons = collections.Counter(
        str(s["data"].get("fallback_reason"))[:90]
        for s in snap.values()
        if not s["data"].get("quiesced")
    )
    print(f"   quiesced {quiesced}/{len(snap)}; fallback reasons: {dict(reasons) or 'none'}")
    by_dom: dict[str, list[str]] = collections.defaultdict(list)
    for r in reqs:
        if r.op_id:  # failed ones too: they ran their snapshot step as well
            by_dom[r.volume.guest.uuid].append(r.op_id)
    lap = 0
    for ids in by_dom.values():
        lap += overlaps(step_times(jpath, ids)["snapshot"])
    print(f"   snapshot steps that began while another snapshot of the SAME guest ran: {lap}")
    print(
        "   snapshots that shared a freeze: none (the agent takes one freeze per request;"
        " nothing batches requests of one guest into one freeze)"
    )


def watchdog_cost(g: Any, n: int = 5) -> float:
    """Median seconds to start, arm and release the per-snapshot thaw watchdog process."""
    from libvirt_ops._thaw_watchdog import ThawWatchdog  # private: measured, not used

    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        dog = ThawWatchdog("qemu:///system", g.uuid)
        dog.arm(30.0)
        dog.done()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--workers", type=int, default=4,
        help="agent [agent] workers and cinder_workers (assisted creates run in the latter)",
    )  # fmt: skip
    ap.add_argument("--guests", type=int, default=2)
    ap.add_argument("--volumes", type=int, default=10, help="in total, spread over the guests")
    ap.add_argument("--per-volume", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--no-burst", action="store_true", help="skip the all-at-once probe")
    args = ap.parse_args()

    from testbed import procs
    from testbed.agent import AgentProcess, noauth_cinder
    from testbed.cinder import CinderRecorder
    from testbed.session import TestBed

    with TestBed("dir", rabbitmq=True) as bed:
        assert bed.rabbit is not None
        each = [
            args.volumes // args.guests + (i < args.volumes % args.guests)
            for i in range(args.guests)
        ]
        guests = [bed.make_guest(ndisks=n, size_mib=args.size_mib) for n in each]
        vols = [
            Volume(g, d.volume_id, g.dir, d.target, [os.path.basename(d.path)])
            for g in guests
            for d in g.disks
        ]
        rec = CinderRecorder()
        reports = Reports()
        rec.updates = reports
        work = procs.run_dir() / f"bench-ops-{uuid.uuid4().hex[:8]}"
        work.mkdir(mode=0o755)
        agent = AgentProcess(
            work, bed.rabbit.transport_url, bed.share.root, prefix="bench", stop_timeout=120,
            conf={
                "DEFAULT": {"use_stderr": "true"},
                "agent": {"workers": args.workers, "cinder_workers": args.workers},
                "cinder": noauth_cinder(rec),
            },
        )  # fmt: skip
        try:
            agent.start()
            clients = [agent.client(timeout=120) for _ in vols]
            print(
                f"{len(vols)} volumes on {len(guests)} TCG guests, {args.per_volume} creates "
                f"per volume, agent workers={args.workers}"
            )
            rates: dict[str, float] = {}
            names = ["baseline", "streams", "guest-streams"] + ([] if args.no_burst else ["burst"])
            for name in names:
                per_vol = precreate(vols, args.per_volume)
                wall = phase(name, clients, reports, per_vol)
                ops, bad = verify(clients[0], reports, per_vol)
                report(name, wall, per_vol, ops, bad, work / "state" / "journal.sqlite")
                rates[name] = len(ops) / wall
            b = rates["baseline"]
            for name in names[1:]:
                print(
                    f"{name} vs baseline: {rates[name] / b:.2f}x succeeded/s "
                    f"({rates[name]:.2f} vs {b:.2f})"
                )
            dog = watchdog_cost(guests[0]) * 1000
            print(f"thaw-watchdog process per quiesced snapshot: {dog:.0f} ms (start+arm+done)")
        finally:
            agent.close()
            rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
