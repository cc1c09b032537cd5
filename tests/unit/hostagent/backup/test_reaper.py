"""OverlayReaper's decisions without a hypervisor: which stops count, stack order, refusals,
and a release a restart interrupted is finished (real qemu-img files, libvirt test driver)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hostagent.backup.online import overlay_name
from hostagent.backup.reaper import OverlayReaper, StrandedOverlay
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from libvirt_ops import Connection
from tests.unit.hostagent.fakes import make_image

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
BASE = f"volume-{VOL}"
K1 = overlay_name(VOL, "11111111-1111-4111-8111-111111111111")
K2 = overlay_name(VOL, "22222222-2222-4222-8222-222222222222")


def _write(path: Path, pattern: int, offset: str) -> None:
    cmd = f"write -P {pattern} {offset} 64k"
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True
    )


def _reads(path: Path, pattern: int, offset: str) -> bool:
    cmd = f"read -P {pattern} {offset} 64k"
    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return "failed" not in out.lower()


def _files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.name.startswith("volume-")}


class _Dom:
    def UUIDString(self) -> str:
        return "dom-1"


@pytest.fixture
def reaper(tmp_path: Path) -> Iterator[tuple[OverlayReaper, Journal]]:
    conn = Connection("test:///default")
    journal = Journal(str(tmp_path / "j.sqlite"))
    yield OverlayReaper(conn, journal, roots=[str(tmp_path)]), journal
    journal.close()
    conn.close()


def test_only_stops_that_free_the_chain_queue_work(
    reaper: tuple[OverlayReaper, Journal],
) -> None:
    r, _ = reaper
    stopped = libvirt.VIR_DOMAIN_EVENT_STOPPED
    for detail in (
        libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
        libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED,
    ):
        r._on_lifecycle(None, _Dom(), stopped, detail)
    r._on_lifecycle(None, _Dom(), libvirt.VIR_DOMAIN_EVENT_STARTED, 0)
    assert r._work.empty()
    r._on_lifecycle(None, _Dom(), stopped, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
    r._on_removed(None, _Dom(), "virtio-disk1")
    assert [r._work.get_nowait(), r._work.get_nowait()] == [
        ("dom-1", "stopped"),
        ("dom-1", "detached"),
    ]


def test_a_stack_is_merged_top_first_into_the_base(
    reaper: tuple[OverlayReaper, Journal], tmp_path: Path
) -> None:
    r, journal = reaper
    make_image(tmp_path / BASE, size="4M")
    make_image(tmp_path / K1, BASE, "4M")
    make_image(tmp_path / K2, K1, "4M")
    _write(tmp_path / K1, 0x11, "0")
    _write(tmp_path / K2, 0x22, "0")  # the newest write wins
    _write(tmp_path / K1, 0x33, "64k")
    op = r.sweep(VOL, "test", directory=str(tmp_path))
    assert op is not None and op.state is OperationState.SUCCEEDED, op
    assert op.result["released"] == [K2, K1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("volume-")) == [BASE]
    assert _reads(tmp_path / BASE, 0x22, "0") and _reads(tmp_path / BASE, 0x33, "64k")
    steps = [(s.name, s.data.get("top") or s.data.get("file")) for s in journal.steps(op.id)]
    assert steps == [("merge", K2), ("remove", K2), ("merge", K1), ("remove", K1)]


def test_two_overlays_on_one_base_are_not_guessed(
    reaper: tuple[OverlayReaper, Journal], tmp_path: Path
) -> None:
    r, _ = reaper
    make_image(tmp_path / BASE, size="4M")
    make_image(tmp_path / K1, BASE, "4M")
    make_image(tmp_path / K2, BASE, "4M")
    before = _files(tmp_path)
    op = r.sweep(VOL, "test", directory=str(tmp_path))
    assert op is not None and op.state is OperationState.FAILED
    assert op.error is not None and op.error.type == StrandedOverlay.__name__
    assert "not one stack" in op.error.message
    assert _files(tmp_path) == before


def test_an_interrupted_release_is_finished_at_start(
    reaper: tuple[OverlayReaper, Journal], tmp_path: Path
) -> None:
    r, journal = reaper
    make_image(tmp_path / BASE, size="4M")
    make_image(tmp_path / K1, BASE, "4M")
    _write(tmp_path / K1, 0x44, "128k")
    request = {"action": "release", "volume_ids": [VOL], "directory": str(tmp_path),
               "overlays": [K1], "why": "stopped"}  # fmt: skip
    op = journal.begin(OperationKind.BACKUP, request, locks=[f"volume:{VOL}"]).operation
    with pytest.raises(KeyboardInterrupt), journal.step(op.id, "merge", {"top": K1}):
        raise KeyboardInterrupt  # a kill leaves the step PLANNED
    assert r.resume() == [f"{VOL}: succeeded"]
    assert journal.get(op.id).state is OperationState.SUCCEEDED
    assert not (tmp_path / K1).exists() and _reads(tmp_path / BASE, 0x44, "128k")
    assert r.resume() == []
