"""What a volume's files must look like to Cinder after any backup, crash or recovery.

Cinder's remotefs driver trusts two things: the ledger ``volume-<vid>.info`` (``active`` =
the file the guest writes, ``<snapshot id> -> file`` for each snapshot) and the qcow2 chain
those files form. A backup's checkpoint is a recorded snapshot like any other, so after
every step the live chain must be exactly the base plus ledger values with the ledger's
``active`` on top, every recorded file must be a layer, and the share must hold no file of
the volume that neither names (the pre-issue-15 ``*.qsnap-bk-*`` overlays were exactly such
files). The ledger is parsed here as Cinder parses it (plain JSON), not with qsnap's reader;
:func:`check_layers` is ``qemu-img check`` of such a chain while the guest writes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any


def ledger(directory: Path, volume_id: str) -> tuple[str, dict[str, str]] | None:
    """(active, snapshot id -> file) of the volume's ``.info``; None when there is none."""
    path = Path(directory) / f"volume-{volume_id}.info"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    active = doc.pop("active")
    assert isinstance(active, str), doc
    return active, {str(k): str(v) for k, v in doc.items()}


def recorded(directory: Path, volume_id: str) -> dict[str, str]:
    """The ledger's snapshots (none without a ledger)."""
    found = ledger(directory, volume_id)
    return {} if found is None else found[1]


def assert_coherent(directory: Path, volume_id: str, chain: list[str], base: str) -> dict[str, str]:
    """The live ``chain`` (top first) as Cinder's ledger says it is; the ledger's snapshots."""
    found = ledger(directory, volume_id)
    active, snaps = found if found is not None else (base, {})
    assert chain[0] == active, f"live top {chain[0]} but the ledger's active is {active}"
    assert chain[-1] == base, chain
    unknown = [n for n in chain if n != base and n not in snaps.values()]
    assert not unknown, f"layers outside the ledger: {unknown} (ledger {snaps})"
    assert set(snaps.values()) <= set(chain), f"ledger {snaps} names files not in {chain}"
    names = os.listdir(directory)
    assert not [n for n in names if ".qsnap-bk-" in n], names
    mine = {n for n in names if n.startswith(f"volume-{volume_id}")}
    stray = mine - set(chain) - {f"volume-{volume_id}.info"}
    assert not stray, f"files of the volume neither in the chain nor the ledger: {stray}"
    return snaps


def check_layers(directory: Path, chain: list[str], guest: Any = None) -> None:
    """``qemu-img check`` of every layer (``-U``: in use). The backing files are read-only
    and must be perfectly clean. The live top is being written by QEMU: read mid-write it may
    show a leak, or a refcount past the file's end (a cluster counted before its data
    landed). With ``guest`` its filesystems are frozen around the check (the freeze flushes
    QEMU's qcow2 caches to the file), so the top must be perfectly clean too; without, only
    the backing files are held to that."""
    frozen = guest is not None and guest.dom.fsFreeze() >= 0
    try:
        for i, name in enumerate(chain):
            argv = ["qemu-img", "check", "-U", "-f", "qcow2", "--output=json",
                    str(directory / name)]  # fmt: skip
            res = subprocess.run(argv, capture_output=True, text=True)
            out = f"qemu-img check {name}: rc {res.returncode} {res.stdout}{res.stderr}"
            if i == 0 and not frozen:
                continue  # mid-write: judged only under a freeze
            assert res.returncode == 0, out
            doc = json.loads(res.stdout)
            assert doc.get("corruptions", 0) == 0 and doc.get("check-errors", 0) == 0, out
    finally:
        if frozen:
            guest.dom.fsThaw()
