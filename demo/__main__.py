"""``python -m demo`` (``make demo``): run the demo, print the timeline and verdict, exit 0/1."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
import warnings


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make demo",
        description="qsnap end to end in one process: boot the test guest, snapshot all its "
        "disks (quiesced) while it writes, delete the snapshots by active commit, back every "
        "disk up (full, then incremental) while it writes, restore each backup to a new file, "
        "check the data. Cleans up everything it started, also on Ctrl-C.",
    )
    parser.add_argument("--disks", type=int, default=3, help="guest disks (default 3)")
    parser.add_argument("--size-mib", type=int, default=64, help="size of each disk")
    ns = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("QSNAP_BED_RUN", f"demo{int(time.time())}{os.getpid()}")
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (&)
    from demo._scenario import run_demo  # heavy imports after the warning filter

    print("qsnap demo: API + agent in one process, a TCG guest writing on 3 disks\n")
    t0 = time.monotonic()
    try:
        res = run_demo(ndisks=ns.disks, size_mib=ns.size_mib)
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started was cleaned up", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("\nFAIL: the demo stopped on the error above (everything it started was "
              "cleaned up)", file=sys.stderr)  # fmt: skip
        return 1
    print()
    for c in res.checks:
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}")
    for p in res.pending:
        print(f"  PENDING  {p}: not available in this build yet")
    stall = "n/a" if res.stall_ms is None else f"{res.stall_ms:.0f} ms"
    read = res.backup_read
    backups = (
        f", backups read {read['full'] / 2**20:.1f} MiB full / "
        f"{read['incremental'] / 2**20:.1f} MiB incremental"
        if read.get("full") and "incremental" in read
        else ""
    )
    verdict = "PASS" if res.ok else "FAIL"
    print(f"\n{verdict}: freeze stall {stall}{backups}, {time.monotonic() - t0:.0f} s in total")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
