"""Issue 14: every layer of a chain stays in the top's share directory.

Two share directories, both allowed roots. A backing file in share A that is a symlink into
share B (or into another directory of A) is refused (rule ``cross-directory``) by every entry
point that inspects a chain, and nothing is changed; the same chain with a regular base, a
symlink within A's own directory, or A reached through a symlinked mount point is accepted.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2
from qcow2 import UnsafeImage
from tests.unit.qcow2.corpus import snap, vol

VID = "0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a"
SID = "0b0b0b0b-0b0b-4b0b-8b0b-0b0b0b0b0b0b"
SID2 = "0c0c0c0c-0c0c-4c0c-8c0c-0c0c0c0c0c0c"
BASE = f"volume-{VID}"
TOP = f"{BASE}.{SID}"


def _img(path: Path, backing: str | None = None, backing_fmt: str = "qcow2") -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    subprocess.run([*args, str(path), "1M"], check=True, capture_output=True)
    return path


@pytest.fixture
def shares(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "share-a", tmp_path / "share-b"
    a.mkdir()
    b.mkdir()
    return a, b


def _tree(*dirs: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            st = p.lstat()
            out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _base_in_b(a: Path, b: Path) -> Path:
    """Share A: TOP -> BASE, where A/BASE is a symlink to a real qcow2 in share B."""
    _img(b / BASE)
    (a / BASE).symlink_to(b / BASE)
    return _img(a / TOP, BASE)


def test_backing_symlink_into_another_share_is_refused(shares: tuple[Path, Path]) -> None:
    a, b = shares
    top = _base_in_b(a, b)
    with pytest.raises(UnsafeImage) as err:
        qcow2.inspect_chain(top, roots=[a, b])
    assert err.value.rule == "cross-directory" and err.value.path == str(a / BASE)
    assert str(b) in err.value.detail


def test_backing_symlink_into_another_directory_of_the_same_share(
    shares: tuple[Path, Path],
) -> None:
    a, _ = shares
    (a / "sub").mkdir()
    _img(a / "sub" / BASE)
    (a / BASE).symlink_to(a / "sub" / BASE)
    with pytest.raises(UnsafeImage) as err:
        qcow2.inspect_chain(_img(a / TOP, BASE), roots=[a])
    assert err.value.rule == "cross-directory"


def test_top_symlink_into_another_share_is_refused(shares: tuple[Path, Path]) -> None:
    """A top that lives in B but is named from A would take its backing from A."""
    a, b = shares
    _img(a / BASE)
    _img(b / TOP, BASE)
    (a / TOP).symlink_to(b / TOP)
    with pytest.raises(UnsafeImage) as err:
        qcow2.inspect_chain(a / TOP, roots=[a, b])
    assert err.value.rule == "cross-directory" and err.value.path == str(a / TOP)


def test_a_middle_layer_in_another_share_is_refused(shares: tuple[Path, Path]) -> None:
    a, b = shares
    mid = f"{BASE}.{SID2}"
    _img(a / BASE)
    _img(b / mid, BASE)  # a real layer in share B, named from A through a symlink
    (a / mid).symlink_to(b / mid)
    top = _img(a / TOP, mid)
    with pytest.raises(UnsafeImage) as err:
        qcow2.inspect_chain(top, roots=[a, b])
    assert (err.value.rule, err.value.path) == ("cross-directory", str(a / mid))


def test_control_chains_inside_one_directory_pass(shares: tuple[Path, Path]) -> None:
    a, b = shares
    _img(a / BASE)
    top = _img(a / TOP, BASE)
    chain = qcow2.inspect_chain(top, roots=[a, b])
    assert [os.path.basename(x.path) for x in chain.layers] == [TOP, BASE]
    chain.close()
    # a symlink that stays in A's own directory is no escape
    other = vol("same-dir")
    (a / BASE).rename(a / other)
    (a / BASE).symlink_to(other)
    with qcow2.inspect_chain(top, roots=[a]) as c:
        assert [os.path.basename(x.path) for x in c.layers] == [TOP, other]
    # A reached through a symlinked directory (a mount point, as Cinder's) resolves into A
    link = a.parent / "mnt-hash"
    link.symlink_to(a, target_is_directory=True)
    with qcow2.inspect_chain(link / TOP, roots=[link]) as c:
        assert len(c.layers) == 2


def _entry_points(a: Path, b: Path) -> list[tuple[str, Callable[[], object]]]:
    roots = [str(a), str(b)]
    return [
        ("inspect_chain", lambda: qcow2.inspect_chain(a / TOP, roots=roots)),
        ("open_chain", lambda: qcow2.open_chain(a / TOP, roots=roots)),
        ("merge_overlay", lambda: qcow2.merge_overlay(str(a / TOP), roots=roots)),
        (
            "create_overlay",
            lambda: qcow2.create_overlay(
                str(a / snap(BASE, "new")), str(a / TOP), backing_fmt="qcow2", roots=roots
            ),
        ),
        (
            "load_volume",
            lambda: qcow2.load_volume(str(a), VID, base_fmt="qcow2", roots=roots),
        ),
        (
            "create_snapshot_offline",
            lambda: qcow2.create_snapshot_offline(str(a), VID, SID2, base_fmt="qcow2", roots=roots),
        ),
        (
            "delete_snapshot_offline",
            lambda: qcow2.delete_snapshot_offline(str(a), VID, SID, base_fmt="qcow2", roots=roots),
        ),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "inspect_chain",
        "open_chain",
        "merge_overlay",
        "create_overlay",
        "load_volume",
        "create_snapshot_offline",
        "delete_snapshot_offline",
    ],
)
def test_every_entry_point_refuses_and_changes_nothing(
    shares: tuple[Path, Path], name: str
) -> None:
    a, b = shares
    _base_in_b(a, b)
    qcow2.write_ledger(str(a), VID, qcow2.Ledger(active=TOP, snapshots={SID: TOP}))
    before = _tree(a, b)
    call = dict(_entry_points(a, b))[name]
    with pytest.raises(UnsafeImage) as err:
        call()
    assert err.value.rule == "cross-directory", name
    assert _tree(a, b) == before
