"""Overlay creation: relative backing name, pinned format, exclusive, nothing left on failure."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from qcow2 import _qemu_img
from qcow2._overlay import create_overlay
from qcow2.errors import ImageExists, QemuImgError, UnsafeImage

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP = "aaaaaaaa-1111-4222-8333-444444444444"
BASE = f"volume-{VOL}"
OVER = f"{BASE}.{SNAP}"
SIZE = 4 << 20


def make(path: Path, fmt: str, size: int = SIZE) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)


def info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)],
        check=True,
        capture_output=True,
    ).stdout
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_relative_name_pinned_format_size_mode(tmp_path: Path, base_fmt: str) -> None:
    make(tmp_path / BASE, base_fmt, 3 * SIZE)
    layer = create_overlay(
        str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt=base_fmt, roots=[str(tmp_path)]
    )
    data = info(tmp_path / OVER)
    assert data["backing-filename"] == BASE  # relative: no directory recorded
    assert data["backing-filename-format"] == base_fmt
    assert data["virtual-size"] == 3 * SIZE
    assert data["cluster-size"] == 65536
    assert layer.backing_name == BASE and layer.backing_fmt == base_fmt
    assert stat.S_IMODE((tmp_path / OVER).stat().st_mode) == 0o660
    assert listing(tmp_path) == sorted([BASE, OVER])  # no temp file left


def test_refuses_backing_outside_roots(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    make(other / BASE, "raw")
    with pytest.raises(UnsafeImage):
        create_overlay(str(other / OVER), str(other / BASE), backing_fmt="raw", roots=[str(root)])
    assert listing(other) == [BASE]


def test_refuses_backing_in_other_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    make(tmp_path / BASE, "raw")
    with pytest.raises(UnsafeImage, match="backing-dir"):
        create_overlay(
            str(tmp_path / "a" / OVER),
            str(tmp_path / BASE),
            backing_fmt="raw",
            roots=[str(tmp_path)],
        )
    assert listing(tmp_path / "a") == []


def test_refuses_existing_target_and_leaves_it_alone(tmp_path: Path) -> None:
    make(tmp_path / BASE, "raw")
    (tmp_path / OVER).write_bytes(b"precious")
    with pytest.raises(ImageExists):
        create_overlay(
            str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt="raw", roots=[str(tmp_path)]
        )
    assert (tmp_path / OVER).read_bytes() == b"precious"
    assert listing(tmp_path) == sorted([BASE, OVER])


def test_refuses_dangling_symlink_target(tmp_path: Path) -> None:
    make(tmp_path / BASE, "raw")
    (tmp_path / OVER).symlink_to(tmp_path / "nowhere")
    with pytest.raises(ImageExists):
        create_overlay(
            str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt="raw", roots=[str(tmp_path)]
        )
    assert not (tmp_path / "nowhere").exists()


def test_refuses_names_outside_convention(tmp_path: Path) -> None:
    make(tmp_path / BASE, "raw")
    with pytest.raises(UnsafeImage, match="name"):
        create_overlay(
            str(tmp_path / "evil.qcow2"),
            str(tmp_path / BASE),
            backing_fmt="raw",
            roots=[str(tmp_path)],
        )
    assert listing(tmp_path) == [BASE]


def test_refuses_unsafe_backing_chain(tmp_path: Path) -> None:
    # The would-be backing is itself a qcow2 whose backing points at a host file.
    subprocess.run(
        [
            *("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw"),
            *(str(tmp_path / BASE), str(SIZE)),
        ],
        check=True,
    )
    with pytest.raises(UnsafeImage):
        create_overlay(
            str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt="qcow2", roots=[str(tmp_path)]
        )
    assert listing(tmp_path) == [BASE]


def test_nothing_left_when_qemu_img_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path / BASE, "raw")
    real = _qemu_img.create_overlay

    def half_then_fail(path: str, **kw: object) -> None:
        real(path, **kw)  # type: ignore[arg-type]
        raise QemuImgError(["qemu-img", "create"], 1, "simulated")

    monkeypatch.setattr(_qemu_img, "create_overlay", half_then_fail)
    with pytest.raises(QemuImgError, match="simulated"):
        create_overlay(
            str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt="raw", roots=[str(tmp_path)]
        )
    assert listing(tmp_path) == [BASE]


def test_nothing_left_when_verification_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(tmp_path / BASE, "raw")
    real = _qemu_img.create_overlay

    def wrong_size(path: str, **kw: object) -> None:
        real(path, backing_name=BASE, backing_fmt="raw", size=2 * SIZE)

    monkeypatch.setattr(_qemu_img, "create_overlay", wrong_size)
    with pytest.raises(UnsafeImage):
        create_overlay(
            str(tmp_path / OVER), str(tmp_path / BASE), backing_fmt="raw", roots=[str(tmp_path)]
        )
    assert listing(tmp_path) == [BASE]
