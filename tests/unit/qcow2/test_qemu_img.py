"""The qemu-img wrapper: pinned formats, limits, timeouts, progress, errors."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from qcow2 import _qemu_img
from qcow2._qemu_img import Limits
from qcow2.errors import QemuImgError

MiB = 1 << 20


def qemu_io(fmt: str, path: Path, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(path)], check=True, capture_output=True)


def raw_hash(path: Path, fmt: str, tmp: Path) -> str:
    out = tmp / "hash.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)], check=True
    )
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_info_pins_format_and_never_probes(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    assert _qemu_img.info(str(img), "qcow2")["format"] == "qcow2"
    # Told "raw", qemu-img must treat the qcow2 file as raw bytes, not detect qcow2.
    assert _qemu_img.info(str(img), "raw")["format"] == "raw"


def test_unknown_format_refused_before_running(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vmdk"):
        _qemu_img.info(str(tmp_path / "x"), "vmdk")


def test_failure_carries_argv_and_stderr(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(QemuImgError) as err:
        _qemu_img.info(missing, "qcow2")
    assert err.value.argv[:2] == ["qemu-img", "info"]
    assert missing in err.value.argv
    assert err.value.returncode != 0
    assert "No such file" in err.value.stderr


def test_address_space_limit_is_applied(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    # 16 MiB of address space is not enough for qemu-img even to start.
    with pytest.raises(QemuImgError):
        _qemu_img.run(["info", "-f", "qcow2", str(img)], limits=Limits(address_space=16 * MiB))


def test_timeout_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "qemu-img"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(_qemu_img, "QEMU_IMG", str(fake))
    with pytest.raises(QemuImgError, match="timed out"):
        _qemu_img.run(["info"], limits=Limits(timeout=0.5))
    with pytest.raises(QemuImgError, match="timed out"):
        _qemu_img.run(["info"], limits=Limits(timeout=0.5), progress=lambda c, e: None)


def test_commit_pins_backing_format_reports_progress_and_keeps_top(tmp_path: Path) -> None:
    base, top = tmp_path / "base", tmp_path / "top"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "4M"], check=True)
    qemu_io("raw", base, "write -P 1 0 4M")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base", "-F", "raw", str(top), "4M"],
        check=True,
    )
    qemu_io("qcow2", top, "write -P 2 1M 1M")
    expected = raw_hash(top, "qcow2", tmp_path)
    top_bytes = top.read_bytes()
    seen: list[tuple[float, float]] = []
    _qemu_img.commit(
        str(top),
        backing_path=str(base),
        backing_fmt="raw",
        progress=lambda cur, end: seen.append((cur, end)),
    )
    assert raw_hash(base, "raw", tmp_path) == expected
    assert top.read_bytes() == top_bytes  # -d: the committed file is not emptied
    assert seen and seen[-1] == (100.0, 100.0)
    assert all(end == 100.0 for _, end in seen)
    assert [c for c, _ in seen] == sorted(c for c, _ in seen)


def test_rebase_unsafe_writes_relative_name_and_pinned_format(tmp_path: Path) -> None:
    for name in ("b1", "b2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / name), "4M"])
    top = tmp_path / "top"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b1", "-F", "raw", str(top), "4M"],
        check=True,
    )
    _qemu_img.rebase_unsafe(str(top), backing_name="b2", backing_fmt="raw")
    data = _qemu_img.info(str(top), "qcow2")
    assert data["backing-filename"] == "b2"
    assert data["backing-filename-format"] == "raw"


def test_check_passes_clean_and_raises_on_corrupt(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    qemu_io("qcow2", img, "write -P 3 0 1M")
    assert _qemu_img.check(str(img))["check-errors"] == 0
    # Point the first L1 entry's refcount-less cluster elsewhere: corrupt the refcount table.
    with open(img, "r+b") as f:
        f.seek(48)  # refcount_table_offset
        f.write((0).to_bytes(8, "big"))
    with pytest.raises(QemuImgError):
        _qemu_img.check(str(img))


def test_option_escape_doubles_commas() -> None:
    assert _qemu_img.opt_escape("/a,b/c") == "/a,,b/c"
