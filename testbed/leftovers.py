"""Audit a finished test run: nothing it started may still be running.

Checks the pids the run recorded (glusterd, bricks, FUSE clients, RabbitMQ, epmd, MariaDB,
Placement, nova-*), libvirt domains and QEMU processes carrying the run id in their name, our
mounts (FUSE, the Nova peer's bind and loop mounts), loop devices backed by files of the run,
and processes the Nova peer's services spawned (privsep helpers) whose command line names a
file of the run.
``python -m testbed.leftovers RUN_ID`` exits 1 and lists what is left.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed import procs


def leftovers(rid: str) -> list[str]:
    found: list[str] = []
    for name, pid, start in procs.started(rid):
        if procs.alive(pid, start):
            found.append(f"{name} pid {pid} still running")
    prefix = f"qsnap-{rid}-"
    out = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
    )
    found += [f"domain {n} still defined" for n in out.stdout.split() if n.startswith(prefix)]
    ps = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    found += [f"qemu process: {line[:120]}" for line in ps.stdout.splitlines() if prefix in line]
    run_root = str(procs.BED_ROOT / "runs" / rid)
    for line in Path("/proc/mounts").read_text().splitlines():
        if run_root in line:
            found.append(f"mount still there: {line.split()[1]}")
    found += [f"loop device {dev} still backed by {f}" for dev, f in _loops() if run_root in f]
    found += [f"process {pid} still running: {cmd[:160]}" for pid, cmd in _spawned(run_root)]
    return found


# Children of the Nova peer that are not recorded by pid (nova-compute's privsep helpers) or
# that a crashed bed may have left; glusterd is left out: it may outlive a run by design.
_SPAWNED = ("privsep-helper", "mariadbd", "nova-", "placement", "wsgi_serve.py",
            "compute_launch.py", "cinder")  # fmt: skip


def _spawned(run_root: str) -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if run_root in cmd and any(word in cmd for word in _SPAWNED):
            out.append((int(d.name), cmd.strip()))
    return out


def _loops() -> list[tuple[str, str]]:
    out = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            out.append((f"/dev/{f.parent.parent.name}", f.read_text().strip()))
        except OSError:
            continue
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m testbed.leftovers RUN_ID", file=sys.stderr)
        return 2
    left = leftovers(argv[1])
    for item in left:
        print(f"LEFTOVER: {item}", file=sys.stderr)
    print(f"leftover check for run {argv[1]}: {'FAILED' if left else 'clean'}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
