"""``make demo``'s core, as CI runs it: one process, API + agent on ``fake://``, a 3-disk TCG
guest writing while all disks are snapshotted (quiesced), then every snapshot deleted by
active commit, then a full and an incremental backup of every disk, each restored to a new
file, then the data judged from the writers' records, the restored files and the images.
"""

from __future__ import annotations

import subprocess

import pytest

from demo._scenario import DEMO_ROOT, run_demo
from testbed import procs

pytestmark = pytest.mark.functional


def test_demo_end_to_end() -> None:
    lines: list[str] = []
    res = run_demo(lines.append, ndisks=3, size_mib=64)
    text = "\n".join(lines)
    failed = [c for c in res.checks if not c.ok]
    assert not failed, text
    assert res.pending == [], text  # every step exists in this build
    names = {c.name for c in res.checks}
    assert "quiesced snapshot of all disks" in names
    assert sum(n.startswith("active commit of ") for n in names) == 3
    assert sum(n.endswith("image after shutdown") for n in names) == 3
    assert res.stall_ms is not None and res.stall_ms > 0
    # backups: a full and a real incremental of each disk, every one restored and judged
    assert {"full backup of all disks", "incremental backup of all disks"} <= names
    assert "the incremental reads far fewer bytes" in names
    assert sum(n.endswith(" full restore") for n in names) == 3
    assert sum(n.endswith(" incremental restore") for n in names) == 3
    assert sum(n.endswith(" checkpoints recorded") for n in names) == 3
    assert text.count("kind incremental, read") == 3
    full, incremental = res.backup_read["full"], res.backup_read["incremental"]
    assert 0 < incremental * 4 <= full, res.backup_read
    for before, after, final in res.chains.values():
        assert len(before) == 1 and len(after) == 2 and after[1] == before[0]
        assert final == before  # the overlay was committed into its base and pivoted back
    assert "notification qsnap.operation.start" in text
    assert "notification qsnap.operation.end" in text
    # the timeline reads in order and everything it started is gone
    stamps = [float(line.split("s", 1)[0].strip(" +")) for line in lines]
    assert stamps == sorted(stamps)
    assert res.dirs and not [d for d in res.dirs if d.exists()]
    assert res.dirs[0].parent == DEMO_ROOT and not (DEMO_ROOT / procs.run_id()).exists()
    out = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not [n for n in out.stdout.split() if n.startswith(f"qsnap-{procs.run_id()}-")]
