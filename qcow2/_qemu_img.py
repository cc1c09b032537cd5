"""The only way this package runs qemu-img.

Why a wrapper: qemu-img probes formats unless told, follows whatever backing name a header
holds and can be made to allocate without bound by a hostile image. Every call here pins
formats, runs under ``prlimit`` (address space and CPU bounds, as oslo.concurrency does for
Cinder and Nova) with a wall-clock timeout, and turns failures into :class:`QemuImgError`.
Callers must have inspected the whole chain (``inspect_chain``) before calling anything here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qcow2.errors import QemuImgError

#: ``(current, end)``; qemu-img reports percent, so ``end`` is 100.
Progress = Callable[[float, float], None]

QEMU_IMG = "qemu-img"
PRLIMIT = "prlimit"

FORMATS = frozenset({"raw", "qcow2"})
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class Limits:
    """Resource bounds for one qemu-img run (1 GiB address space is what Cinder uses)."""

    address_space: int = 1 << 30
    cpu_seconds: int = 30
    timeout: float = 60.0


#: For metadata-only calls (info, check, create, rebase -u).
META = Limits()
#: For calls that copy data (commit, convert): CPU and wall time grow with the volume, and
#: QEMU's I/O thread pool grows (up to 64 threads, 8 MiB stack each) when storage is slow:
#: 1 GiB was seen to fail thread creation under load. Tables were bounded by inspection.
BULK = Limits(address_space=4 << 30, cpu_seconds=3600, timeout=4 * 3600.0)

#: Few malloc arenas: each reserves 64 MiB of address space per thread that gets one.
_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MALLOC_ARENA_MAX": "2"}


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r} (allowed: {sorted(FORMATS)})")
    return fmt


def opt_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (commas are doubled)."""
    return value.replace(",", ",,")


def run(
    args: list[str],
    *,
    limits: Limits = META,
    progress: Progress | None = None,
    pass_fds: tuple[int, ...] = (),
) -> str:
    """Run ``qemu-img ARGS`` bounded by ``limits``; return stdout (progress lines removed).

    With ``progress`` the caller must have put ``-p`` in ``args``; qemu-img then writes
    ``(NN.NN/100%)\\r`` records that are parsed as they arrive. ``pass_fds`` stay open in
    qemu-img under the same numbers, so ``/proc/self/fd/N`` paths name exactly those files.
    """
    argv = [QEMU_IMG, *args]
    cmd = [
        PRLIMIT,
        f"--as={limits.address_space}",
        f"--cpu={limits.cpu_seconds}",
        "--",
        *argv,
    ]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_ENV,
            pass_fds=pass_fds,
        )
    except OSError as exc:
        raise QemuImgError(argv, -1, str(exc)) from exc
    try:
        if progress is None:
            out, err = proc.communicate(timeout=limits.timeout)
        else:
            out, err = _communicate_with_progress(proc, progress, limits.timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise QemuImgError(argv, -9, f"timed out after {limits.timeout} s") from exc
    if proc.returncode != 0:
        raise QemuImgError(argv, proc.returncode, err.decode(errors="replace"))
    return _PROGRESS_RE.sub(b"", out).replace(b"\r", b"").decode(errors="replace")


def _communicate_with_progress(
    proc: subprocess.Popen[bytes], progress: Progress, timeout: float
) -> tuple[bytes, bytes]:
    """Read stdout incrementally to report progress; stderr is drained by a thread.

    Why a thread: a full stderr pipe would block qemu-img while we wait on stdout.
    """
    assert proc.stdout is not None and proc.stderr is not None
    err_chunks: list[bytes] = []
    stderr = proc.stderr
    drain = threading.Thread(target=lambda: err_chunks.append(stderr.read()), daemon=True)
    drain.start()
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, _expire)
    timer.start()
    out = bytearray()
    last = -1.0
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            out += chunk
            tail = bytes(out[-256:])
            found = _PROGRESS_RE.findall(tail)
            if found:
                cur = float(found[-1])
                if cur != last:
                    last = cur
                    progress(cur, 100.0)
        proc.wait()
    finally:
        timer.cancel()
        drain.join()
    if expired.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return bytes(out), b"".join(err_chunks)


def info(path: str, fmt: str, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img info`` of ONE image (no chain walk), format pinned, ``-U`` by default."""
    args = ["info", "--output=json", "-f", _fmt(fmt)]
    if force_share:
        args.append("-U")
    data = json.loads(run([*args, path]))
    if not isinstance(data, dict):
        raise QemuImgError([QEMU_IMG, *args, path], 0, "info did not return an object")
    return data


def check(path: str) -> dict[str, Any]:
    """``qemu-img check`` of a qcow2 image (read-only, ``-U``); raises on any error/leak."""
    args = ["check", "--output=json", "-f", "qcow2", "-U", path]
    data = json.loads(run(args))  # exit status 2/3 (corruption/leaks) raises in run()
    if not isinstance(data, dict):
        raise QemuImgError([QEMU_IMG, *args], 0, "check did not return an object")
    return data


def create_overlay(path: str, *, backing_name: str, backing_fmt: str, size: int) -> None:
    """Create a 64 KiB-cluster qcow2 at ``path`` backed by ``backing_name`` (relative).

    qemu-img resolves the relative name against ``path``'s directory; ``-F`` pins the
    backing format in the header so nothing ever probes it later.
    """
    run(
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-b",
            backing_name,
            "-F",
            _fmt(backing_fmt),
            path,
            str(size),
        ]
    )


def commit(
    path: str,
    *,
    backing_path: str,
    backing_fmt: str,
    progress: Progress | None = None,
) -> None:
    """Commit qcow2 ``path`` into its backing file, leaving ``path`` as it was (``-d``).

    ``--image-opts`` pins BOTH formats: plain ``commit -f`` would let qemu take the backing
    format from the header or probe it.
    """
    opts = ",".join(
        [
            "driver=qcow2",
            "file.driver=file",
            f"file.filename={opt_escape(path)}",
            f"backing.driver={_fmt(backing_fmt)}",
            "backing.file.driver=file",
            f"backing.file.filename={opt_escape(backing_path)}",
        ]
    )
    args = ["commit", "--image-opts", "-d"]
    if progress is not None:
        args.append("-p")
    run([*args, opts], limits=BULK, progress=progress)


def rebase_unsafe(path: str, *, backing_name: str, backing_fmt: str) -> None:
    """Rewrite only the backing name/format in ``path``'s header (``rebase -u``)."""
    run(["rebase", "-q", "-f", "qcow2", "-u", "-b", backing_name, "-F", _fmt(backing_fmt), path])


def convert_to_raw(path: str, fmt: str, dest: str, *, progress: Progress | None = None) -> None:
    """Guest-visible data of ``path`` (through its chain) into raw file ``dest``."""
    args = ["convert", "-U", "-f", _fmt(fmt), "-O", "raw"]
    if progress is not None:
        args.append("-p")
    run([*args, path, dest], limits=BULK, progress=progress)


def convert_raw_fd_to_qcow2(src_fd: int, dest_dir_fd: int, dest_name: str) -> None:
    """Raw data of the open file ``src_fd`` into a NEW qcow2 file ``dest_name`` created in
    the open directory ``dest_dir_fd``: both are reached through ``/proc/self/fd``, so no
    path someone else could swap is ever resolved (the restore's private directory)."""
    if "/" in dest_name or dest_name in ("", ".", ".."):
        raise ValueError(f"bad file name {dest_name!r}")
    src, dest = f"/proc/self/fd/{src_fd}", f"/proc/self/fd/{dest_dir_fd}/{dest_name}"
    run(
        ["convert", "-q", "-f", "raw", "-O", "qcow2", src, dest],
        limits=BULK,
        pass_fds=(src_fd, dest_dir_fd),
    )
