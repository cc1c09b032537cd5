"""Shares that hold volume files: a plain directory and a real GlusterFS FUSE mount.

Both give QEMU (user libvirt-qemu) a traversable tree. The Gluster share runs a
single-brick volume on this host; glusterd is started only when it is not already running,
and stopped at the end only if this run started it (by pid).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Protocol

from testbed import procs

GLUSTER_LOCK = procs.BED_ROOT / "glusterd.lock"


class Share(Protocol):
    kind: str
    root: Path

    def new_dir(self, prefix: str) -> Path: ...
    def close(self) -> None: ...


def _mkdir755(path: Path) -> Path:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path


class DirShare:
    """A plain directory standing in for an NFS export already mounted on the host."""

    kind = "dir"

    def __init__(self, base: Path | None = None) -> None:
        self.root = _mkdir755((base or procs.run_dir()) / f"dir-share-{uuid.uuid4().hex[:6]}")

    def new_dir(self, prefix: str) -> Path:
        return _mkdir755(self.root / f"{prefix}-{uuid.uuid4().hex[:6]}")

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _gluster(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        ["gluster", "--mode=script", *args], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"gluster {' '.join(args)}: {out.stdout}{out.stderr}".strip())
    return out.stdout


def _glusterd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "glusterd"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


class GlusterShare:
    """A single-brick GlusterFS volume mounted with the FUSE client."""

    kind = "gluster"

    def __init__(self, base: Path | None = None, timeout: float = 60.0) -> None:
        self._base = _mkdir755((base or procs.run_dir()) / f"gluster-{uuid.uuid4().hex[:6]}")
        self.volume = f"qsnap{procs.run_id()}{uuid.uuid4().hex[:4]}"
        self._brick = _mkdir755(self._base / "brick")
        self.root = _mkdir755(self._base / "mnt")
        self._glusterd: int | None = None
        self._fuse_pid: int | None = None
        self._brick_pid: int | None = None
        # Shared lock: other concurrent runs using glusterd keep it alive past our teardown.
        self._lock_fd = os.open(GLUSTER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, timeout: float) -> None:
        if _glusterd_pid() is None:
            pidfile = self._base / "glusterd.pid"
            subprocess.run(["glusterd", "-p", str(pidfile)], check=True, timeout=60)
            self._glusterd = int(pidfile.read_text().strip())
            procs.record("glusterd", self._glusterd)
        deadline = time.monotonic() + timeout
        while True:
            try:
                _gluster("volume", "list", timeout=10)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        _gluster("volume", "create", self.volume, f"{socket.gethostname()}:{self._brick}", "force")
        _gluster("volume", "start", self.volume)
        pidglob = list(Path(f"/var/run/gluster/vols/{self.volume}").glob("*.pid"))
        if pidglob:
            self._brick_pid = int(pidglob[0].read_text().strip())
            procs.record("glusterfsd", self._brick_pid)
        subprocess.run(
            ["mount", "-t", "glusterfs", f"localhost:/{self.volume}", str(self.root)],
            check=True,
            timeout=60,
        )
        os.chmod(self.root, 0o755)
        out = subprocess.run(
            ["pgrep", "-f", f"volfile-id=/{self.volume} "], capture_output=True, text=True
        )
        for pid in out.stdout.split():
            self._fuse_pid = int(pid)
            procs.record("glusterfs-fuse", self._fuse_pid)

    def new_dir(self, prefix: str) -> Path:
        return _mkdir755(self.root / f"{prefix}-{uuid.uuid4().hex[:6]}")

    def close(self) -> None:
        """Unmount, stop and delete our volume, stop glusterd if we started it and nobody
        else uses it."""
        if os.path.ismount(self.root):
            subprocess.run(["umount", str(self.root)], check=False, timeout=60)
            if os.path.ismount(self.root):
                subprocess.run(["umount", "-l", str(self.root)], check=False, timeout=60)
        for pid, name in ((self._fuse_pid, "glusterfs-fuse"),):
            if pid is not None:
                procs.stop(pid, timeout=10)
                procs.forget(name, pid)
        try:
            _gluster("volume", "stop", self.volume, "force")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        try:
            _gluster("volume", "delete", self.volume)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if self._brick_pid is not None:
            procs.stop(self._brick_pid, timeout=10)
            procs.forget("glusterfsd", self._brick_pid)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        if self._glusterd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                procs.stop(self._glusterd, timeout=20)
                procs.forget("glusterd", self._glusterd)
            except BlockingIOError:
                pass  # another run still uses it; it outlives us by design
        os.close(self._lock_fd)
        shutil.rmtree(self._base, ignore_errors=True)


def make_share(kind: str) -> DirShare | GlusterShare:
    if kind == "dir":
        return DirShare()
    if kind == "gluster":
        return GlusterShare()
    raise ValueError(f"unknown share kind {kind!r}")
