"""Host-side helpers for test volumes: create an empty ext4 volume, look inside one offline.

Why: tests must judge an image (a snapshot, a merged base, a restored backup) by what the
guest would see, without mounting it on the host (no loop devices, no nbd here). Everything
goes through a raw copy under /var/tmp that qemu-img produces, then e2fsprogs reads it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qcow2.naming import is_uuid

SCRATCH = Path("/var/tmp")
FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class FsckResult:
    ok: bool
    needs_recovery: bool
    output: str


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{argv!r} failed rc={res.returncode}: {res.stderr.strip()}")
    return res


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported format {fmt!r}")


def create_volume(directory: Path, volume_id: str, size_mib: int = 256, fmt: str = "qcow2") -> Path:
    """Create directory/volume-<uuid> holding an empty ext4 filesystem, mode 0644."""
    if not is_uuid(volume_id):
        raise ValueError(f"not a volume uuid: {volume_id!r}")
    _check_fmt(fmt)
    path = directory / f"volume-{volume_id}"
    if path.exists():
        raise FileExistsError(path)
    raw = path if fmt == "raw" else directory / f".volume-{volume_id}.raw"
    try:
        with open(raw, "wb") as f:
            f.truncate(size_mib << 20)
        _run(["mkfs.ext4", "-q", "-F", str(raw)])
        if fmt == "qcow2":
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    path.chmod(0o644)
    return path


@contextmanager
def _raw_copy(image: Path, fmt: str, backing_fmt: str | None = None) -> Iterator[Path]:
    """Guest-visible contents of image (and its chain) as a temporary raw file.

    backing_fmt is checked against the image's recorded backing format: an image whose
    chain is not what the test expects should fail here, not be read as something else.
    """
    _check_fmt(fmt)
    if backing_fmt is not None:
        _check_fmt(backing_fmt)
        info = _run(["qemu-img", "info", "-U", "-f", fmt, "--output=json", str(image)]).stdout
        m = re.search(r'"backing-filename-format":\s*"(\w+)"', info)
        if not m or m.group(1) != backing_fmt:
            raise ValueError(f"{image}: backing format is not {backing_fmt}")
    fd, tmp = tempfile.mkstemp(dir=SCRATCH, prefix="qsnap-raw-")
    os.close(fd)
    try:
        _run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), tmp])
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def read_guest_file(
    image: Path, fmt: str, inner_path: str, *, backing_fmt: str | None = None
) -> bytes:
    """Bytes of inner_path inside the ext4 filesystem of image, as the guest would read it."""
    if not inner_path.startswith("/") or any(c in inner_path for c in "\n\"'"):
        raise ValueError(f"bad inner path {inner_path!r}")
    with _raw_copy(image, fmt, backing_fmt) as raw:
        fd, out = tempfile.mkstemp(dir=SCRATCH, prefix="qsnap-dump-")
        os.close(fd)
        try:
            res = _run(["debugfs", "-R", f'dump "{inner_path}" {out}', str(raw)])
            data = Path(out).read_bytes()
            if not data and "not found" in res.stderr.lower():
                raise FileNotFoundError(f"{inner_path} in {image}: {res.stderr.strip()}")
            return data
        finally:
            os.unlink(out)


def fsck_clean(image: Path, fmt: str) -> FsckResult:
    """e2fsck -fn verdict and whether the journal still needs recovery (an unquiesced copy)."""
    with _raw_copy(image, fmt) as raw:
        stats = _run(["debugfs", "-R", "stats", str(raw)]).stdout
        feats = re.search(r"^Filesystem features:(.*)$", stats, re.M)
        needs_recovery = bool(feats and "needs_recovery" in feats.group(1).split())
        res = subprocess.run(
            ["e2fsck", "-fn", str(raw)], capture_output=True, text=True, check=False
        )
        return FsckResult(res.returncode == 0, needs_recovery, res.stdout + res.stderr)


def image_sha256(image: Path, fmt: str) -> str:
    """SHA-256 of the guest-visible data (whole chain), independent of the file layout."""
    with _raw_copy(image, fmt) as raw:
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
