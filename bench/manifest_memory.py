"""Issue 15 (repository): list, prune and GC over 100 backups of a 1 TiB volume, memory and
time, each in a fresh interpreter (peak RSS is the child's own ``ru_maxrss``).

The repository is synthetic but in the real format: 100 manifests of a 1 TiB volume in 4 MiB
chunks (262,144 data extents each, ~24 MB of JSON), each backup changing 1% of the chunks.
Chunk files: 200 tiny ones (100 referenced, 100 not; the listing never reads them, GC's
manifest walk is what costs). Answers printed: backups listed, chunk files GC removed (100),
backups prune deleted (keep_last 90: 10).
Printed against baselines from the same run: an interpreter that only imports the package,
and ONE manifest loaded whole (what the pre-streaming ``Repository.manifests()`` held per
backup, for all of them at once). Targets: each phase under 256 MB; the listing well within
the 60 s RPC timeout. ``QSNAP_BENCH_BACKUPS`` / ``QSNAP_BENCH_TIB`` shrink it for a quick run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from hostagent.backup.repo import RepoConfig, Repository

BACKUPS = int(os.environ.get("QSNAP_BENCH_BACKUPS", "100"))
TIB = float(os.environ.get("QSNAP_BENCH_TIB", "1"))
CHUNK = 4 << 20
EXTENTS = int(TIB * (1 << 40)) // CHUNK
CHANGED = max(1, EXTENTS // 100)
LIMIT_MB = 256.0
RPC_TIMEOUT = 60.0

_CHILD = r"""
import json, resource, sys, time
from hostagent.backup.repo import Manifest, Repository, RetentionPolicy, prune
phase, path, vol = sys.argv[1], sys.argv[2], sys.argv[3]
repo = Repository.open(path)
t = time.perf_counter()
out = None
if phase == "list":
    out = len(repo.headers(vol))
elif phase == "gc":
    out = repo.gc(grace=0.0).removed
elif phase == "prune":
    out = len(prune(repo, RetentionPolicy(keep_last=90), volume_id=vol, grace=0.0).deleted)
elif phase == "one":
    h = repo.headers(vol)[-1]
    out = len(repo.load(vol, h.backup_id).extents)
took = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"phase": phase, "s": took, "rss_mb": rss, "out": out}))
"""


def _stamp(i: int) -> str:
    return f"2026-12-05T10:{i // 60:02d}:{i % 60:02d}.000000Z"


def _cid(n: int) -> str:
    return f"{n:064x}"


def _write(repo: Repository, vol: str, i: int, parent: str | None) -> str:
    """Manifest ``i``: the base chunks, a moving 1% window replaced by new ids."""
    bid = str(uuid.uuid4())
    lo = (i * CHANGED) % max(1, EXTENTS - CHANGED)
    ids = (n if not lo <= n < lo + CHANGED else (i + 1) << 40 | n for n in range(EXTENTS))
    ext = ",".join(f'[{n * CHUNK},{CHUNK},"data","{_cid(c)}",0]' for n, c in enumerate(ids))
    head = {
        "format": "qsnap-manifest", "version": 1, "backup_id": bid, "volume_id": vol,
        "virtual_size": EXTENTS * CHUNK, "created_at": _stamp(i),
        "parent_id": parent, "kind": "full" if parent is None else "incremental",
        "source_chain": [{"name": f"volume-{vol}", "format": "raw"}], "read_bytes": CHANGED * CHUNK,
        "fallback_reason": None, "checkpoint": None, "data_bytes": EXTENTS * CHUNK,
        "chunks": EXTENTS,
    }  # fmt: skip
    raw = json.dumps(head, separators=(",", ":"))[:-1] + ',"extents":[' + ext + "]}"
    d = Path(repo.path) / "backups" / vol
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{bid}.json").write_text(raw)
    return bid


def _child(phase: str, repo: Path, vol: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, phase, str(repo), vol],
        check=False, capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{phase} failed: {res.stderr[-2000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="qsnap-bench-manifests-", dir="/var/tmp"))
    try:
        repo = Repository.create(base / "repo", RepoConfig(chunk_size=CHUNK, zstd_level=1))
        vol = str(uuid.uuid4())
        t = time.perf_counter()
        parent = None
        for i in range(BACKUPS):
            parent = _write(repo, vol, i, parent)
        size = sum(p.stat().st_size for p in (base / "repo" / "backups" / vol).iterdir())
        took = time.perf_counter() - t
        print(f"repository: {BACKUPS} backups of a {TIB:g} TiB volume, {EXTENTS} extents "
              f"each, {size / 1e6:.0f} MB of manifests (written in {took:.0f} s)")  # fmt: skip
        idle = _child("none", base / "repo", vol)
        one = _child("one", base / "repo", vol)
        print(f"baseline: interpreter + package {idle['rss_mb']:.0f} MB; ONE manifest loaded "
              f"whole {one['rss_mb']:.0f} MB in {one['s']:.1f} s (x{BACKUPS} held at once before "
              f"streaming: ~{one['rss_mb'] * BACKUPS / 1024:.1f} GB)")  # fmt: skip
        worst = 0.0
        for n in range(200):  # referenced (base) and unreferenced chunk files, aged
            cid = _cid(n if n < 100 else (1 << 60) | n)
            repo.put_chunk(cid, b"x")
            os.utime(repo.chunk_path(cid), (0, 0))
        for phase in ("list", "gc", "prune"):
            r = _child(phase, base / "repo", vol)
            worst = max(worst, r["rss_mb"])
            extra = f", {r['s'] / RPC_TIMEOUT:.3f}x the RPC timeout" if phase == "list" else ""
            print(f"{phase}: peak {r['rss_mb']:.0f} MB ({r['rss_mb'] / LIMIT_MB:.2f}x the "
                  f"{LIMIT_MB:.0f} MB target, {r['rss_mb'] / one['rss_mb']:.2f}x one whole "
                  f"manifest) in {r['s']:.1f} s{extra}; answer {r['out']}")  # fmt: skip
        print(f"worst peak {worst:.0f} MB: {'within' if worst < LIMIT_MB else 'OVER'} the target")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
