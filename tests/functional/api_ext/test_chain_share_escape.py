"""Issue 14: a chain in share A whose base is a symlink into share B, with real files.

Two plain-directory shares (testbed.shares.DirShare, as the agent's ``[agent] share_roots``
would list two mounted exports), real qcow2/raw files made by qemu-img, real qemu-io reads:
first that the escape is real (QEMU follows the symlink and serves share B's bytes as the
guest-visible data of a volume in share A), then that every qcow2 entry point the agent uses
refuses the chain before any tool runs (nothing on either share changes), and, as the
control, that the same chain with its base inside share A is inspected, snapshotted and
merged by the real qemu-img.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcow2
from qcow2 import UnsafeImage
from testbed.shares import DirShare

pytestmark = pytest.mark.functional


@pytest.fixture
def shares() -> Iterator[tuple[Path, Path]]:
    a, b = DirShare(), DirShare()
    yield a.root, b.root
    a.close()
    b.close()


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _tree(*dirs: Path) -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for d in dirs:
        for p in sorted(d.iterdir()):
            st = p.lstat()
            digest = "" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


class Volume:
    """volume-<id> (raw, 4 MiB) and one snapshot overlay on it, in share ``a``; with
    ``base_in`` the base really lives there and ``a/volume-<id>`` is a symlink to it."""

    def __init__(self, a: Path, base_in: Path | None = None) -> None:
        self.id, self.snap = str(uuid.uuid4()), str(uuid.uuid4())
        self.dir = a
        self.base, self.top = f"volume-{self.id}", f"volume-{self.id}.{self.snap}"
        real_base = (base_in or a) / self.base
        _run("qemu-img", "create", "-q", "-f", "raw", str(real_base), "4M")
        _run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", str(real_base))
        if base_in is not None:
            (a / self.base).symlink_to(real_base)
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.base,
             str(a / self.top))  # fmt: skip
        _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x17 1M 1M", str(a / self.top))
        qcow2.write_ledger(
            str(a), self.id, qcow2.Ledger(active=self.top, snapshots={self.snap: self.top})
        )


def test_the_escape_is_real_for_qemu(shares: tuple[Path, Path]) -> None:
    """Threat check: QEMU reads share B's bytes as the volume's data (so it must be refused)."""
    a, b = shares
    vol = Volume(a, base_in=b)
    out = _run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x42 0 1M", str(a / vol.top))
    assert "Pattern verification failed" not in out
    info = _run("qemu-img", "info", "-U", "--backing-chain", "-f", "qcow2", str(a / vol.top))
    assert vol.base in info


def _entry_points(vol: Volume, roots: list[str]) -> dict[str, Callable[[], object]]:
    a = vol.dir
    new = f"volume-{vol.id}.{uuid.uuid4()}"
    return {
        "inspect_chain": lambda: qcow2.inspect_chain(a / vol.top, roots=roots).close(),
        "open_chain": lambda: qcow2.open_chain(a / vol.top, roots=roots).close(),
        "create_overlay": lambda: qcow2.create_overlay(
            str(a / new), str(a / vol.top), backing_fmt="qcow2", roots=roots
        ),
        "merge_overlay": lambda: qcow2.merge_overlay(str(a / vol.top), roots=roots),
        "load_volume": lambda: qcow2.load_volume(str(a), vol.id, base_fmt="raw", roots=roots),
        "create_snapshot_offline": lambda: qcow2.create_snapshot_offline(
            str(a), vol.id, str(uuid.uuid4()), base_fmt="raw", roots=roots
        ),
        "delete_snapshot_offline": lambda: qcow2.delete_snapshot_offline(
            str(a), vol.id, vol.snap, base_fmt="raw", roots=roots
        ),
    }


def test_every_entry_point_refuses_a_base_in_another_share(shares: tuple[Path, Path]) -> None:
    a, b = shares
    vol = Volume(a, base_in=b)
    roots = [str(a), str(b)]  # B is an allowed root too: that alone must not be enough
    before = _tree(a, b)
    for name, call in _entry_points(vol, roots).items():
        with pytest.raises(UnsafeImage) as err:
            call()
        assert (err.value.rule, err.value.path) == ("cross-directory", str(a / vol.base)), name
        assert _tree(a, b) == before, name


def test_control_the_same_chain_inside_share_a_is_served(shares: tuple[Path, Path]) -> None:
    a, b = shares
    vol = Volume(a)
    roots = [str(a), str(b)]
    with qcow2.open_chain(a / vol.top, roots=roots) as chain:
        assert [p.path for p in chain.layers] == [str(a / vol.top), str(a / vol.base)]
    new_snap = str(uuid.uuid4())
    ledger = qcow2.create_snapshot_offline(str(a), vol.id, new_snap, base_fmt="raw", roots=roots)
    assert ledger.active == f"volume-{vol.id}.{new_snap}"
    ledger = qcow2.delete_snapshot_offline(str(a), vol.id, vol.snap, base_fmt="raw", roots=roots)
    assert vol.snap not in ledger.snapshots
    # the merged chain still shows both writes, through the real qemu-io
    top = a / ledger.active
    for cmd in ("read -P 0x42 0 1M", "read -P 0x17 1M 1M"):
        out = _run("qemu-io", "-r", "-f", "qcow2", "-c", cmd, str(top))
        assert "Pattern verification failed" not in out
    assert list(b.iterdir()) == []
