"""Helpers for the snapshot functional tests and bench (not bed features; L1's own).

``python -m tests.functional.libvirt_ops.snapshot_helpers URI DOM_UUID MAX_FROZEN MOUNT...``
freezes MOUNTs through :class:`libvirt_ops._quiesce.Frozen` (watchdog armed), prints
``frozen`` and hangs: the test then kills or stops it to prove the watchdog thaws.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import libvirt_ops as lo
from libvirt_ops import _snapshot
from testbed.records import RecordLog


def spec(g: Any, index: int) -> lo.DiskSnapshotSpec:
    """A Cinder-style new_file for disk ``index`` of guest ``g``."""
    vol = g.disks[index].volume_id
    return lo.DiskSnapshotSpec(new_file=f"volume-{vol}.{uuid.uuid4()}", volume_id=vol)


@contextmanager
def hold_inside_freeze(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """Sleep just before snapshotCreateXML, i.e. inside our freeze window.

    The TCG guest's writers show 50-180 ms gaps under host load; stretching the window to
    ``seconds`` makes the freeze stall unmistakable while changing nothing else.
    """
    real = _snapshot._call

    def slow(dom: Any, xml: str, flags: int) -> float:
        time.sleep(seconds)
        return real(dom, xml, flags)

    with monkeypatch.context() as m:
        m.setattr(_snapshot, "_call", slow)
        yield


def stalls(log: RecordLog, since_ns: int, over_ns: int) -> list[tuple[int, int]]:
    """Gaps longer than ``over_ns`` between records stamped after ``since_ns``."""
    return [(a, b) for a, b in log.gaps_over(over_ns) if a >= since_ns]


def main(argv: list[str]) -> int:
    import libvirt

    from libvirt_ops._quiesce import Frozen

    uri, dom_uuid, max_frozen, *mounts = argv
    dom = libvirt.open(uri).lookupByUUIDString(dom_uuid)
    frozen = Frozen(dom, uri, tuple(mounts), freeze_timeout=10, max_frozen=float(max_frozen))
    frozen.__enter__()
    print("frozen", flush=True)
    time.sleep(3600)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
