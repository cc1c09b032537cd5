"""Boot-to-agent time of the test-bed guest: median of 5 boots (target <= 10 s here).

Baseline in the same run: the guest's own uptime when its init printed READY (read from
the console), so the ratio shows what libvirt start-up and the agent event add on top of
the kernel's boot, independent of how loaded this noisy host is right now.
Run: ``.venv/bin/python bench/boot_to_agent.py [--share dir|gluster] [-n 5]``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.session import TestBed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", default="dir", choices=["dir", "gluster"])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    totals: list[float] = []
    uptimes: list[float] = []
    with TestBed(args.share) as bed:
        for i in range(args.n):
            g = bed.make_guest(ndisks=2, size_mib=64)
            console = g.console.read_text(errors="replace")
            m = re.search(r"uptime ([0-9.]+) s", console)
            uptimes.append(float(m.group(1)) if m else float("nan"))
            totals.append(g.boot_to_agent_s)
            print(
                f"boot {i + 1}: create->agent {g.boot_to_agent_s:.2f} s, guest uptime at "
                f"READY {uptimes[-1]:.2f} s",
                flush=True,
            )
            g.destroy()
    med, base = statistics.median(totals), statistics.median(uptimes)
    print(
        f"boot-to-agent median of {args.n}: {med:.2f} s (target <= 10 s: "
        f"{'met' if med <= 10 else 'MISSED'})"
    )
    print(
        f"baseline (guest's own boot to READY) median: {base:.2f} s; "
        f"ratio total/baseline: {med / base:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
