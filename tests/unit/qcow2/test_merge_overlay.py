"""merge_overlay: an offline overlay's data lands in its backing file, nothing else moves."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qcow2 import UnsafeImage, create_overlay, merge_overlay

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP = "aaaaaaaa-1111-4222-8333-444444444444"
BASE = f"volume-{VOL}"
OVER = f"{BASE}.{SNAP}"
SIZE = 4 << 20


def _io(path: Path, fmt: str, cmd: str) -> str:
    out = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", cmd, str(path)], check=True, capture_output=True, text=True
    )
    assert "failed" not in out.stdout.lower(), (
        out.stdout
    )  # qemu-io -P: "Pattern verification failed"
    return out.stdout


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_overlay_data_lands_in_backing(tmp_path: Path, base_fmt: str) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", base_fmt, str(tmp_path / BASE), str(SIZE)], check=True
    )
    _io(tmp_path / BASE, base_fmt, "write -P 0x11 0 1M")
    create_overlay(
        str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt=base_fmt, roots=[str(tmp_path)]
    )
    _io(tmp_path / OVER, "qcow2", "write -P 0x22 512k 1M")
    merged_into = merge_overlay(str(tmp_path / OVER), roots=[str(tmp_path)])
    assert merged_into == str(tmp_path / BASE)
    assert "read 524288/524288" in _io(tmp_path / BASE, base_fmt, "read -P 0x11 0 512k")
    assert "read 1048576/1048576" in _io(tmp_path / BASE, base_fmt, "read -P 0x22 512k 1M")
    assert (tmp_path / OVER).exists()  # the caller unlinks it once nothing refers to it


def test_refuses_without_backing_or_outside_roots(tmp_path: Path) -> None:
    lone = tmp_path / OVER
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(lone), str(SIZE)], check=True)
    with pytest.raises(UnsafeImage, match="no backing"):
        merge_overlay(str(lone), roots=[str(tmp_path)])
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    with pytest.raises(UnsafeImage):
        merge_overlay(str(lone), roots=[str(elsewhere)])
