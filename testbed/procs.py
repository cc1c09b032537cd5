"""What this test run started, so teardown and the leftover check touch only that.

Every daemon the bed starts (glusterd, RabbitMQ, epmd, libvirtd after a restart) is recorded
by pid under the run's directory; domains carry the run id in their name. A run id comes
from ``QSNAP_BED_RUN`` (set once by ``make``/conftest) so a separate checker process can
audit the run after pytest exits.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

BED_ROOT = Path("/var/lib/qsnap-test")


def run_id() -> str:
    """This run's id; created once per process tree and exported to children."""
    rid = os.environ.get("QSNAP_BED_RUN")
    if not rid:
        rid = uuid.uuid4().hex[:8]
        os.environ["QSNAP_BED_RUN"] = rid
    return rid


def run_dir(rid: str | None = None) -> Path:
    """``/var/lib/qsnap-test/runs/<id>``, traversable by QEMU (0755 all the way)."""
    d = BED_ROOT / "runs" / (rid or run_id())
    for p in (BED_ROOT, BED_ROOT / "runs", d):
        p.mkdir(mode=0o755, exist_ok=True)
        os.chmod(p, 0o755)
    return d


def record(name: str, pid: int) -> None:
    """Remember that this run started ``pid`` (as ``name``)."""
    pdir = run_dir() / "started"
    pdir.mkdir(exist_ok=True)
    (pdir / f"{name}.{pid}").write_text(_starttime(pid) or "")


def forget(name: str, pid: int) -> None:
    (run_dir() / "started" / f"{name}.{pid}").unlink(missing_ok=True)


def _starttime(pid: int) -> str | None:
    """Process start time (jiffies): tells a reused pid from ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, starttime: str | None = None) -> bool:
    st = _starttime(pid)
    if st is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        return False
    return starttime in (None, "") or st == starttime


def stop(pid: int, *, timeout: float = 15.0, group: bool = False) -> bool:
    """SIGTERM, wait (bounded), then SIGKILL; True when the process is gone."""
    send = os.killpg if group else os.kill
    try:
        send(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return not alive(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        _reap(pid)
        time.sleep(0.05)
    try:
        send(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid):
        _reap(pid)
        time.sleep(0.05)
    return not alive(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def started(rid: str | None = None) -> list[tuple[str, int, str]]:
    """(name, pid, starttime) of everything recorded by a run."""
    pdir = run_dir(rid) / "started"
    out = []
    if pdir.is_dir():
        for f in pdir.iterdir():
            name, _, pid = f.name.rpartition(".")
            out.append((name, int(pid), f.read_text()))
    return out
