"""Audit a finished test run: nothing it started may still be running.

Checks the pids the run recorded (glusterd, bricks, FUSE clients, RabbitMQ, epmd), libvirt
domains and QEMU processes carrying the run id in their name, and our FUSE mounts.
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
    return found


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
