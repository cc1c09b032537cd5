"""Bench P2: delete the newest snapshot of a 4 GiB volume (2 GiB data, 64 MiB new since).

Ours (active commit of the overlay into its backing file + pivot) against Nova's way
(``blockRebase(disk, None)``: a pull that copies the whole base into the overlay), on the
same running guest in the same run. Prints both times, the speed ratio (target >= 25x) and
the bytes each copied against the overlay's allocated data (target <= 1.1x).

Data goes into the running disk from the host with HMP ``qemu-io`` (no guest involvement),
at 1 GiB and up, where the idle guest's fresh ext4 has nothing it reads.

Run: ``PYTHONPATH=. .venv/bin/python bench/delete_newest.py [--share dir|gluster]``
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import libvirt_ops as lo
from testbed.layers import allocated, hmp_write, snapshot_disk
from testbed.session import TestBed

MIB = 1 << 20
GIB = 1 << 30


def hmp_io(dom: Any, cmd: str) -> None:
    out = hmp_write(dom, 0, cmd)
    if "error" in out.lower() or "failed" in out.lower():
        raise RuntimeError(f"qemu-io {cmd}: {out}")


def write(dom: Any, pattern: int, offset: int, length: int, chunk: int = 128 * MIB) -> None:
    for off in range(offset, offset + length, chunk):
        hmp_io(dom, f"write -P {pattern:#x} {off} {min(chunk, offset + length - off)}")
    hmp_io(dom, "flush")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", default="dir", choices=["dir", "gluster"])
    args = ap.parse_args()
    with TestBed(share_kind=args.share) as bed:
        g = bed.make_guest(ndisks=1, size_mib=4096)
        roots = [str(bed.share.root)]
        vol = g.disks[0].volume_id
        t = time.monotonic()
        write(g.dom, 0x11, 1 * GIB, 2 * GIB)
        print(f"setup: 2 GiB written into the base in {time.monotonic() - t:.1f} s")

        # Ours: snapshot, 64 MiB new data, delete the newest by active commit + pivot.
        ov = snapshot_disk(g.dom, "vda", vol)
        write(g.dom, 0x5A, 1 * GIB, 64 * MIB)
        ours_overlay = allocated(ov)
        t = time.monotonic()
        res = lo.active_commit(g.conn, g.dom, vol, roots=roots)
        ours_s = time.monotonic() - t
        ours_bytes = res.job_bytes or 0

        # Nova: same shape again, deleted by pulling the whole base into the overlay.
        ov2 = snapshot_disk(g.dom, "vda", vol)
        write(g.dom, 0x5B, 1 * GIB, 64 * MIB)
        nova_overlay = allocated(ov2)
        seen: list[tuple[int, int]] = []
        opts = lo.JobOptions(progress=lambda c, e: seen.append((c, e)), progress_interval=0.2)
        t = time.monotonic()
        res2 = lo.flatten(g.conn, g.dom, vol, roots=roots, options=opts)
        nova_s = time.monotonic() - t
        nova_bytes = allocated(ov2) - nova_overlay  # what the pull added to the overlay

    assert res.chain_after[0] != str(ov) and res2.chain_after == (str(ov2),)
    ratio = nova_s / ours_s
    print(
        f"overlay data (64 MiB written): ours {ours_overlay / MIB:.1f} MiB, "
        f"nova {nova_overlay / MIB:.1f} MiB"
    )
    print(
        f"active commit + pivot : {ours_s:7.3f} s, copied {ours_bytes / MIB:8.1f} MiB "
        f"(job end) = {ours_bytes / ours_overlay:.2f}x the overlay (target <= 1.1x)"
    )
    print(
        f"nova pull (rebase None): {nova_s:7.3f} s, copied {nova_bytes / MIB:8.1f} MiB "
        f"into the overlay = {nova_bytes / nova_overlay:.1f}x the overlay; job end "
        f"{(seen[-1][1] if seen else 0) / MIB:.0f} MiB"
    )
    print(f"speed ratio nova/ours: {ratio:.1f}x (target >= 25x; anchor here 2.77 s / 0.10 s)")
    ok = ratio >= 25 and ours_bytes <= 1.1 * ours_overlay
    print("P2", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
