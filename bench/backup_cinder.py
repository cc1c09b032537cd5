"""Our engine vs Cinder 29's own ``PosixBackupDriver`` on the same data, full and incremental.

The volume is bench/backup_full.py's (4 GiB virtual, 2 GiB data in 1 MiB extents with 1 MiB
holes, half random half text), once as the qcow2 our engine reads and once converted to the
sparse raw file Cinder's driver reads (``driver.backup(backup, volume_file)``, what
cinder-backup does with an attached file volume). Cinder runs unmodified in a subprocess
with ``.venv-cinder``'s python, eventlet monkey-patched like cinder-backup, default options
(zlib, ~2 GB objects, SHA-256 per 32 KiB); only its DB, notifier and volume-metadata
lookups are stubbed (they cost nothing next to the data path). Then 40 scattered 1 MiB
changes (same slots and bytes for both): Cinder writes them into its raw file and runs an
incremental with ``parent_id`` (re-reads and re-hashes everything); ours writes them into
the previous backup's checkpoint file (a snapshot overlay, as the online path finds it) and
runs :func:`backup_incremental` above the boundary.

Prints times, bytes read, stored sizes and ratios (P3: full vs the stock pipe is in
bench/backup_full.py; here ours vs Cinder; P4: our incremental reads <= 1.1x the changed
bytes and takes <= 0.05x Cinder's incremental). Page cache warm for both sides. Usage::

    .venv/bin/python bench/backup_cinder.py [--dir /var/tmp/qsnap-bench-cinder] [--size 4G]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CINDER_PY = ROOT / ".venv-cinder" / "bin" / "python"
MiB = 1 << 20
GiB = 1 << 30
CHANGES = 40


# --- Cinder side: runs under .venv-cinder's python (no qsnap imports) ----------------------


def _cinder_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``PosixBackupDriver.backup()`` call; returns seconds, bytes read, container."""
    from cinder import monkey_patch

    monkey_patch.patch()  # cinder-backup runs monkey-patched: its tpool paths are taken
    import contextlib

    from cinder.backup import chunkeddriver
    from cinder.backup.drivers import posix
    from oslo_config import cfg

    cfg.CONF([], project="cinder")
    cfg.CONF.set_override("connection", "sqlite://", group="database")  # never queried

    class FakeBackup(dict[str, Any]):
        """The fields ``chunkeddriver`` reads and writes; a dict for its ``backup['x']``."""

        def __getattr__(self, name: str) -> Any:
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

        def __setattr__(self, name: str, value: Any) -> None:
            self[name] = value

        def save(self) -> None:
            pass

        def refresh(self) -> None:
            pass

        def as_read_deleted(self) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

    def fake(b: dict[str, Any]) -> FakeBackup:
        f = FakeBackup(
            display_name=None,
            display_description=None,
            created_at="2025-01-01T00:00:00",
            status="creating",
            container=None,
            service_metadata=None,
            parent_id=None,
        )
        f.update(b)
        return f

    parent = fake(spec["parent"]) if spec.get("parent") else None

    class FakeObjects:
        class Backup:
            @staticmethod
            def get_by_id(_ctx: object, bid: str) -> FakeBackup:
                assert parent is not None and parent.id == bid
                return parent

    class FakeDb:
        @staticmethod
        def volume_get(_ctx: object, _vid: str) -> dict[str, Any]:
            return {"size": spec["size_gib"]}

    chunkeddriver.objects = FakeObjects
    chunkeddriver.volume_utils.notify_about_backup_usage = lambda *a, **k: None
    driver = posix.PosixBackupDriver(None, backup_path=spec["repo"])
    driver.db = FakeDb
    driver.get_metadata = lambda _vid: None
    backup = fake(
        {
            "id": spec["id"],
            "volume_id": spec["volume_id"],
            "size": spec["size_gib"],
            "parent_id": parent.id if parent else None,
        }
    )

    class Counting:
        """The volume file, counting what the driver reads (cinder wraps it in a tpool)."""

        def __init__(self, f: Any) -> None:
            self._f, self.read_bytes = f, 0

        def read(self, n: int = -1) -> bytes:
            data: bytes = self._f.read(n)
            self.read_bytes += len(data)
            return data

        def tell(self) -> int:
            return int(self._f.tell())

    from eventlet import tpool

    with open(spec["volume_file"], "rb") as f:
        vf = Counting(f)
        t0 = time.perf_counter()
        driver.backup(backup, tpool.Proxy(vf))
        secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "read_bytes": vf.read_bytes,
        "backup": {k: backup[k] for k in ("id", "volume_id", "size", "container")}
        | {"service_metadata": backup["service_metadata"]},
        "objects": backup["object_count"],
    }


def cinder_backup(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`_cinder_worker` under .venv-cinder's python; its result from stdout."""
    p = subprocess.run(
        [str(CINDER_PY), __file__, "--cinder-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise RuntimeError(f"cinder worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


# --- our side (qsnap's .venv) ---------------------------------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/qsnap-bench-cinder")
    ap.add_argument("--size", default="4G", help="virtual size, whole GiB (e.g. 4G)")
    args = ap.parse_args()
    if not CINDER_PY.exists():
        sys.exit(f"no Cinder venv at {CINDER_PY.parent.parent}: run tools/cinder_setup.sh")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from backup_full import VOL, build, timed, tree_bytes

    from hostagent.backup.repo import Repository, backup_full, backup_incremental

    size = int(args.size.rstrip("G")) * GiB
    d = Path(args.dir)
    share = d / "share"
    t_build, base = timed(lambda: build(share, size))
    for p in share.iterdir():
        if p != base:
            p.unlink()
    work = d / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = work / "cinder-volume.raw"  # what Cinder's driver reads: same guest bytes, sparse
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(base), str(raw))
    print(
        f"volume: {size / GiB:.0f} GiB virtual, {base} (built/reused in {t_build:.1f} s) "
        f"and the same bytes as sparse raw {raw.name} for Cinder"
    )
    _run("cat", str(base), str(raw))  # page cache warm for both sides alike

    crepo = work / "cinder-repo"
    crepo.mkdir()
    spec = {"volume_id": VOL, "size_gib": size // GiB, "repo": str(crepo)}
    c_full = cinder_backup(spec | {"id": str(uuid.uuid4()), "volume_file": str(raw)})
    c_full_stored = tree_bytes(crepo / c_full["backup"]["container"])

    repo = Repository.create(work / "repo")
    t_full, full = timed(lambda: backup_full(base, "qcow2", [share], repo, VOL))
    stored = tree_bytes(Path(repo.path) / "chunks")
    print(
        f"full  Cinder PosixBackupDriver: {c_full['seconds']:.1f} s, read "
        f"{c_full['read_bytes'] / MiB:.0f} MiB, stored {c_full_stored / MiB:.0f} MiB "
        f"({c_full['objects']} objects, zlib)"
    )
    print(
        f"full  ours: {t_full:.2f} s, read {full.bytes_read / MiB:.0f} MiB, stored "
        f"{stored / MiB:.0f} MiB -> {t_full / c_full['seconds']:.3f}x Cinder's time, "
        f"{c_full['seconds'] / t_full:.1f}x faster, {stored / c_full_stored:.3f}x its size "
        f"(P3's target, <= 0.5x the nbdcopy|zstd pipe, is in bench/backup_full.py)"
    )

    # 40 scattered 1 MiB changes (bench/backup_full.py's slots), each with its own random
    # bytes so that neither side's stored size is flattered by identical change blocks.
    rnd = random.Random(40)
    slots = rnd.sample(range(size // MiB), CHANGES)
    cmds: list[str] = []
    for i, s in enumerate(slots):
        src = work / f"chg{i}"
        src.write_bytes(rnd.randbytes(MiB))
        cmds += ["-c", f"write -s {src} {s * MiB} {MiB}"]
    _run("qemu-io", "-f", "raw", *cmds, str(raw))
    ov = share / f"volume-{VOL}.{uuid.uuid5(uuid.NAMESPACE_OID, 'cinder-checkpoint')}"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(ov))
    _run("qemu-io", "-f", "qcow2", *cmds, str(ov))
    changed = CHANGES * MiB

    c_inc = cinder_backup(
        spec | {"id": str(uuid.uuid4()), "volume_file": str(raw), "parent": c_full["backup"]}
    )
    c_inc_stored = tree_bytes(crepo / c_inc["backup"]["container"])
    before = stored
    # A fresh handle, as backup_volume opens one per request (a long-lived handle fsyncs
    # every chunk directory it ever wrote at each publish: ~0.15 s more here).
    again = Repository.open(repo.path)
    t_inc, inc = timed(
        lambda: backup_incremental(ov, "qcow2", [share], again, VOL, full.manifest, base.name)
    )
    inc_stored = tree_bytes(Path(repo.path) / "chunks") - before
    print(
        f"incr  Cinder: {c_inc['seconds']:.2f} s, read {c_inc['read_bytes'] / MiB:.0f} MiB "
        f"({c_inc['read_bytes'] / changed:.1f}x the {changed / MiB:.0f} MiB changed), stored "
        f"{c_inc_stored / MiB:.1f} MiB"
    )
    print(
        f"incr  ours: {t_inc:.3f} s -> {t_inc / c_inc['seconds']:.4f}x Cinder's time "
        f"(target <= 0.05x); read {inc.bytes_read / MiB:.1f} MiB -> "
        f"{inc.bytes_read / changed:.3f}x the changed bytes (target <= 1.1x); stored "
        f"{inc_stored / MiB:.1f} MiB new ({inc.chunks_new} new chunks, "
        f"{inc.fallback_reason or 'no fallback'})"
    )
    ov.unlink()
    shutil.rmtree(work)


if __name__ == "__main__" and sys.argv[1:2] == ["--cinder-worker"]:
    print(json.dumps(_cinder_worker(json.loads(sys.argv[2]))))
    sys.exit(0)

if __name__ == "__main__":
    main()
