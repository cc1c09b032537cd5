"""Offline snapshot create/delete with Cinder's semantics, checked against qemu-img.

A 5-snapshot chain (raw and qcow2 base) gets distinct data written between snapshots, then
the snapshots are deleted in many orders. After every step: the active file's guest data is
unchanged, every remaining snapshot's point-in-time data (the backing of its mapped file)
is what it was when taken, backing names are relative, ``qemu-img check`` passes, the
ledger matches the real chain and no stray file is left.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcow2 import _offline, _qemu_img
from qcow2._ledger import Ledger, dump_ledger, read_ledger, write_ledger
from qcow2._offline import create_snapshot_offline, delete_snapshot_offline, load_volume
from qcow2.errors import LedgerError, Qcow2Error, SnapshotExists, SnapshotNotFound, UnsafeImage

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
BASE = f"volume-{VOL}"
SNAPS = [f"{i:08x}-1111-4222-8333-444444444444" for i in range(1, 6)]
SIZE = 4 << 20
KiB = 1024


def run(*argv: str) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def qemu_io(path: Path, fmt: str, cmd: str) -> None:
    run("qemu-io", "-f", fmt, "-c", cmd, str(path))


def guest_hash(path: Path, fmt: str) -> str:
    out = path.parent.parent / f"convert-{os.getpid()}.raw"
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out))
    try:
        return hashlib.sha256(out.read_bytes()).hexdigest()
    finally:
        out.unlink()


def img_info(path: Path, fmt: str) -> dict[str, object]:
    data = json.loads(run("qemu-img", "info", "-U", "--output=json", "-f", fmt, str(path)))
    assert isinstance(data, dict)
    return data


def real_chain(d: Path, top: str, top_fmt: str) -> list[tuple[str, str]]:
    """(name, fmt) top first, walked with qemu-img (independent of the code under test)."""
    out = [(top, top_fmt)]
    while True:
        name, fmt = out[-1]
        data = img_info(d / name, fmt)
        backing = data.get("backing-filename")
        if backing is None:
            return out
        assert isinstance(backing, str) and "/" not in backing, backing  # relative name
        bfmt = data.get("backing-filename-format")
        assert isinstance(bfmt, str)
        out.append((backing, bfmt))


def write_step(path: Path, fmt: str, step: int) -> None:
    """Distinct, overlapping data per step; a zero write on one step."""
    off = step * 512 * KiB
    qemu_io(path, fmt, f"write -P {0x10 + step} {off} {1024 * KiB}")
    qemu_io(path, fmt, f"write -P {0x80 + step} {3 * 1024 * KiB + step * 64 * KiB} 4k")
    if step == 3:
        qemu_io(path, fmt, f"write -z {off + 256 * KiB} 128k")


@dataclass
class Volume:
    dir: Path
    base_fmt: str
    roots: list[str]
    taken: dict[str, str]  # snapshot id -> guest hash at the time it was taken
    active_hash: str

    def ledger(self) -> Ledger:
        got = read_ledger(str(self.dir), VOL)
        return got if got is not None else Ledger(active=BASE)

    def fmt_of(self, name: str) -> str:
        return self.base_fmt if name == BASE else "qcow2"

    def verify(self) -> None:
        ledger = self.ledger()
        chain = real_chain(self.dir, ledger.active, self.fmt_of(ledger.active))
        names = [n for n, _ in chain]
        assert names[-1] == BASE and chain[-1][1] == self.base_fmt
        assert guest_hash(self.dir / ledger.active, self.fmt_of(ledger.active)) == self.active_hash
        assert sorted(ledger.snapshots) == sorted(self.taken)
        for snap, name in ledger.snapshots.items():
            assert name in names[:-1], (snap, name, names)
            backing, bfmt = chain[names.index(name) + 1]
            assert guest_hash(self.dir / backing, bfmt) == self.taken[snap], snap
        for name, fmt in chain:
            if fmt == "qcow2":
                _qemu_img.check(str(self.dir / name))
        ledger_files = [f"{BASE}.info"] if (self.dir / f"{BASE}.info").exists() else []
        assert sorted(os.listdir(self.dir)) == sorted(names + ledger_files)


def build(d: Path, base_fmt: str) -> Volume:
    d.mkdir(mode=0o755)
    run("qemu-img", "create", "-q", "-f", base_fmt, str(d / BASE), str(SIZE))
    vol = Volume(d, base_fmt, [str(d.parent)], {}, "")
    for step, snap in enumerate(SNAPS):
        active = vol.ledger().active
        write_step(d / active, vol.fmt_of(active), step)
        vol.taken[snap] = guest_hash(d / active, vol.fmt_of(active))
        ledger = create_snapshot_offline(str(d), VOL, snap, base_fmt=base_fmt, roots=vol.roots)
        assert ledger.active == ledger.snapshots[snap] == f"{BASE}.{snap}"
        assert vol.ledger() == ledger
    write_step(d / vol.ledger().active, "qcow2", len(SNAPS))
    vol.active_hash = guest_hash(d / vol.ledger().active, "qcow2")
    vol.verify()
    return vol


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Volume]:
    root = tmp_path_factory.mktemp("templates")
    return {fmt: build(root / fmt, fmt) for fmt in ("raw", "qcow2")}


def clone(template: Volume, d: Path) -> Volume:
    shutil.copytree(template.dir, d, symlinks=True)
    return Volume(d, template.base_fmt, [str(d.parent)], dict(template.taken), template.active_hash)


def delete_one(vol: Volume, i: int) -> None:
    """Delete snapshot ``i`` offline and check everything that must hold afterwards."""
    snap = SNAPS[i]
    seen: list[tuple[float, float]] = []
    new = delete_snapshot_offline(
        str(vol.dir),
        VOL,
        snap,
        base_fmt=vol.base_fmt,
        roots=vol.roots,
        progress=lambda c, e, seen=seen: seen.append((c, e)),  # type: ignore[misc]
    )
    del vol.taken[snap]
    assert new == vol.ledger()
    assert seen and seen[-1] == (100.0, 100.0)
    vol.verify()


def delete_in_order(vol: Volume, order: list[int]) -> None:
    for i in order:
        delete_one(vol, i)
    assert vol.ledger() == Ledger(active=BASE)


def delete_every_order(vol: Volume, remaining: list[int], scratch: Path, done: list[int]) -> None:
    """Depth-first over the permutation tree: each distinct prefix is deleted once and its
    state cloned for the sibling branches, so all 120 orders cost 325 deletes, not 600."""
    if not remaining:
        assert vol.ledger() == Ledger(active=BASE)
        done.append(1)
        return
    for k, i in enumerate(remaining):
        last = k == len(remaining) - 1
        branch = vol if last else clone(vol, scratch / f"n{len(done)}-{len(remaining)}-{k}")
        delete_one(branch, i)
        delete_every_order(branch, [j for j in remaining if j != i], scratch, done)
        if not last:
            shutil.rmtree(branch.dir)


def orders() -> Iterator[tuple[str, list[int]]]:
    yield "newest-first", [4, 3, 2, 1, 0]
    yield "oldest-first", [0, 1, 2, 3, 4]
    yield "middle-out", [2, 1, 3, 0, 4]
    rnd = random.Random(3)
    perms = list(itertools.permutations(range(5)))
    for p in rnd.sample(perms, 4):
        yield "random-" + "".join(map(str, p)), list(p)


ORDERS = list(orders())


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("order", [o for _, o in ORDERS], ids=[n for n, _ in ORDERS])
def test_delete_orders(
    templates: dict[str, Volume], tmp_path: Path, base_fmt: str, order: list[int]
) -> None:
    delete_in_order(clone(templates[base_fmt], tmp_path / "v"), order)


@pytest.mark.slow
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_delete_every_order(templates: dict[str, Volume], tmp_path: Path, base_fmt: str) -> None:
    done: list[int] = []
    delete_every_order(
        clone(templates[base_fmt], tmp_path / "root"), list(range(5)), tmp_path, done
    )
    assert len(done) == len(list(itertools.permutations(range(5)))) == 120


def test_interleaved_create_and_delete(tmp_path: Path) -> None:
    vol = build(tmp_path / "v", "raw")
    for snap in [SNAPS[1], SNAPS[4]]:
        delete_snapshot_offline(str(vol.dir), VOL, snap, base_fmt="raw", roots=vol.roots)
        del vol.taken[snap]
        vol.verify()
    extra = "eeeeeeee-1111-4222-8333-444444444444"
    vol.taken[extra] = vol.active_hash
    create_snapshot_offline(str(vol.dir), VOL, extra, base_fmt="raw", roots=vol.roots)
    write_step(vol.dir / vol.ledger().active, "qcow2", 6)
    vol.active_hash = guest_hash(vol.dir / vol.ledger().active, "qcow2")
    vol.verify()
    for snap in [SNAPS[3], extra, SNAPS[0], SNAPS[2]]:
        delete_snapshot_offline(str(vol.dir), VOL, snap, base_fmt="raw", roots=vol.roots)
        del vol.taken[snap]
        vol.verify()


# --- bad input: typed error, nothing touched -------------------------------------------


def fingerprint(d: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((d / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(d))
        if not (d / name).is_symlink()
    } | {name: "symlink" for name in os.listdir(d) if (d / name).is_symlink()}


@pytest.fixture
def vol(templates: dict[str, Volume], tmp_path: Path) -> Volume:
    return clone(templates["qcow2"], tmp_path / "v")


def test_unknown_snapshot_id(vol: Volume) -> None:
    before = fingerprint(vol.dir)
    with pytest.raises(SnapshotNotFound):
        delete_snapshot_offline(
            str(vol.dir),
            VOL,
            "99999999-1111-4222-8333-444444444444",
            base_fmt="qcow2",
            roots=vol.roots,
        )
    assert fingerprint(vol.dir) == before


@pytest.mark.parametrize(
    "snap", ["../../etc/passwd", "not-a-uuid", "AAAAAAAA-1111-4222-8333-444444444444"]
)
def test_malformed_snapshot_id(vol: Volume, snap: str) -> None:
    before = fingerprint(vol.dir)
    for op in (create_snapshot_offline, delete_snapshot_offline):
        with pytest.raises(LedgerError):
            op(str(vol.dir), VOL, snap, base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


def tamper_ledger(vol: Volume, content: dict[str, str]) -> None:
    (vol.dir / f"{BASE}.info").write_text(json.dumps(content, indent=1, sort_keys=True))


@pytest.mark.parametrize(
    "mapped",
    [
        f"{BASE}.77777777-1111-4222-8333-444444444444",  # no such file
        f"{BASE}.tmp-snap-77777777-1111-4222-8333-444444444444",  # exists, not in chain
        BASE,  # the base file: it has no backing, so no point-in-time data
    ],
)
def test_ledger_names_file_not_in_chain(vol: Volume, mapped: str) -> None:
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        str(vol.dir / f"{BASE}.tmp-snap-77777777-1111-4222-8333-444444444444"),
        str(SIZE),
    )
    ledger = vol.ledger().to_json_dict()
    ledger[SNAPS[2]] = mapped
    tamper_ledger(vol, ledger)
    before = fingerprint(vol.dir)
    for op in (create_snapshot_offline, delete_snapshot_offline):
        with pytest.raises(LedgerError, match="not an overlay in the chain"):
            op(str(vol.dir), VOL, SNAPS[2], base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


@pytest.mark.parametrize(
    "mapped", [f"sub/{BASE}.{SNAPS[2]}", f"/etc/{BASE}", f"../v/{BASE}.{SNAPS[2]}"]
)
def test_ledger_value_with_a_path(vol: Volume, mapped: str) -> None:
    ledger = vol.ledger().to_json_dict()
    ledger[SNAPS[2]] = mapped
    tamper_ledger(vol, ledger)
    before = fingerprint(vol.dir)
    with pytest.raises(LedgerError, match=f"{BASE}.info"):
        delete_snapshot_offline(str(vol.dir), VOL, SNAPS[2], base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


def test_active_with_a_path_in_ledger(vol: Volume) -> None:
    ledger = vol.ledger().to_json_dict()
    ledger["active"] = f"../v/{BASE}.{SNAPS[4]}"
    tamper_ledger(vol, ledger)
    before = fingerprint(vol.dir)
    with pytest.raises(LedgerError):
        create_snapshot_offline(
            str(vol.dir),
            VOL,
            "99999999-1111-4222-8333-444444444444",
            base_fmt="qcow2",
            roots=vol.roots,
        )
    assert fingerprint(vol.dir) == before


def test_backing_name_with_a_path_in_chain(vol: Volume) -> None:
    # Point the middle overlay's header at the base through a path: inspection must refuse.
    run(
        "qemu-img",
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        f"../v/{BASE}",
        "-F",
        "qcow2",
        str(vol.dir / f"{BASE}.{SNAPS[0]}"),
    )
    before = fingerprint(vol.dir)
    for op in (create_snapshot_offline, delete_snapshot_offline):
        with pytest.raises(UnsafeImage):
            op(str(vol.dir), VOL, SNAPS[1], base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


def test_wrong_base_format_refused(vol: Volume) -> None:
    before = fingerprint(vol.dir)
    with pytest.raises(UnsafeImage):
        delete_snapshot_offline(str(vol.dir), VOL, SNAPS[1], base_fmt="raw", roots=vol.roots)
    assert fingerprint(vol.dir) == before


def test_outside_roots_refused(vol: Volume, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    before = fingerprint(vol.dir)
    with pytest.raises(UnsafeImage):
        delete_snapshot_offline(
            str(vol.dir), VOL, SNAPS[1], base_fmt="qcow2", roots=[str(tmp_path / "elsewhere")]
        )
    assert fingerprint(vol.dir) == before


def test_empty_ledger_refused(vol: Volume) -> None:
    (vol.dir / f"{BASE}.info").write_bytes(b"")
    before = fingerprint(vol.dir)
    with pytest.raises(LedgerError, match="empty"):
        delete_snapshot_offline(str(vol.dir), VOL, SNAPS[1], base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


# --- idempotency and crash recovery ------------------------------------------------------


def test_create_twice_is_idempotent_and_conflicts_refused(vol: Volume) -> None:
    ledger = vol.ledger()
    before = fingerprint(vol.dir)
    assert (
        create_snapshot_offline(str(vol.dir), VOL, SNAPS[4], base_fmt="qcow2", roots=vol.roots)
        == ledger
    )
    assert fingerprint(vol.dir) == before
    with pytest.raises(SnapshotExists):
        create_snapshot_offline(str(vol.dir), VOL, SNAPS[1], base_fmt="qcow2", roots=vol.roots)
    assert fingerprint(vol.dir) == before


class Crash(Exception):
    pass


def crash_once(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    real = getattr(module, name)
    state = {"armed": True}

    def wrapper(*args: object, **kwargs: object) -> object:
        if state["armed"]:
            state["armed"] = False
            raise Crash(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_create_crash_before_ledger_then_rerun(
    vol: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = "eeeeeeee-1111-4222-8333-444444444444"
    crash_once(monkeypatch, _offline, "write_ledger")
    with pytest.raises(Crash):
        create_snapshot_offline(str(vol.dir), VOL, new, base_fmt="qcow2", roots=vol.roots)
    assert (vol.dir / f"{BASE}.{new}").exists()  # overlay made, ledger not updated
    ledger = create_snapshot_offline(str(vol.dir), VOL, new, base_fmt="qcow2", roots=vol.roots)
    assert ledger.active == ledger.snapshots[new] == f"{BASE}.{new}"
    vol.taken[new] = vol.active_hash
    vol.verify()


@pytest.mark.parametrize(
    ("snap_index", "step"),
    [
        (4, "commit"),  # active snapshot
        (4, "write_ledger"),
        (4, "unlink_durable"),
        (1, "commit"),  # intermediate snapshot
        (1, "write_ledger"),
        (1, "rebase_unsafe"),
        (1, "unlink_durable"),
    ],
)
def test_delete_crash_then_rerun_finishes(
    vol: Volume, monkeypatch: pytest.MonkeyPatch, snap_index: int, step: str
) -> None:
    module = _qemu_img if step in ("commit", "rebase_unsafe") else _offline
    crash_once(monkeypatch, module, step)
    snap = SNAPS[snap_index]
    with pytest.raises(Crash):
        delete_snapshot_offline(str(vol.dir), VOL, snap, base_fmt="qcow2", roots=vol.roots)
    # Whatever state the crash left, the data as Cinder would see it is intact...
    ledger = vol.ledger()
    assert guest_hash(vol.dir / ledger.active, "qcow2") == vol.active_hash
    load_volume(str(vol.dir), VOL, base_fmt="qcow2", roots=vol.roots)
    # ...and a re-run completes the deletion (or reports it already done).
    try:
        delete_snapshot_offline(str(vol.dir), VOL, snap, base_fmt="qcow2", roots=vol.roots)
    except SnapshotNotFound:
        pytest.fail("re-run found nothing to finish although the crash left work")
    del vol.taken[snap]
    vol.verify()
    with pytest.raises(SnapshotNotFound):
        delete_snapshot_offline(str(vol.dir), VOL, snap, base_fmt="qcow2", roots=vol.roots)


def test_no_ledger_means_no_snapshots(tmp_path: Path) -> None:
    d = tmp_path / "v"
    d.mkdir()
    run("qemu-img", "create", "-q", "-f", "raw", str(d / BASE), str(SIZE))
    with pytest.raises(SnapshotNotFound):
        delete_snapshot_offline(str(d), VOL, SNAPS[0], base_fmt="raw", roots=[str(tmp_path)])
    assert os.listdir(d) == [BASE]
    ledger = create_snapshot_offline(str(d), VOL, SNAPS[0], base_fmt="raw", roots=[str(tmp_path)])
    assert (d / f"{BASE}.info").read_bytes() == dump_ledger(ledger)


def test_qcow2_error_hierarchy() -> None:
    for exc in (SnapshotNotFound, SnapshotExists, LedgerError, UnsafeImage):
        assert issubclass(exc, Qcow2Error)


def test_write_ledger_used_for_recovery_is_cinder_format(vol: Volume) -> None:
    # The ledger our operations leave is exactly what Cinder's json.dump call would write.
    raw = (vol.dir / f"{BASE}.info").read_bytes()
    assert raw == json.dumps(json.loads(raw), indent=1, sort_keys=True).encode()
    write_ledger(str(vol.dir), VOL, vol.ledger())
    assert (vol.dir / f"{BASE}.info").read_bytes() == raw
