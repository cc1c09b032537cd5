"""One snapshot per domain at a time: the guest agent has a single freeze state."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import libvirt_ops as lo
from libvirt_ops import _snapshot


def _run(monkeypatch: pytest.MonkeyPatch, domains: list[str]) -> int:
    """Start one take_snapshot per entry at once; return the most that ran together."""
    lock = threading.Lock()
    now = [0, 0]  # running, peak

    def fake(conn: Any, request: lo.SnapshotRequest, *, roots: Any) -> Any:
        with lock:
            now[0] += 1
            now[1] = max(now[1], now[0])
        time.sleep(0.2)
        with lock:
            now[0] -= 1
        return request.domain

    monkeypatch.setattr(_snapshot, "_take_snapshot", fake)
    spec = lo.DiskSnapshotSpec("volume-x.y", volume_id="6f1ed002-ab5d-42de-b2a0-a21e0c2d4d6e")
    reqs = [lo.SnapshotRequest(d, (spec,), lo.QuiescePolicy.OFF) for d in domains]
    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(lambda r: lo.take_snapshot(None, r, roots=()), reqs))  # type: ignore[arg-type]
    assert got == domains
    return now[1]


def test_same_domain_is_serialized(monkeypatch: pytest.MonkeyPatch) -> None:
    dom = "6f1ed002-ab5d-42de-b2a0-a21e0c2d4d6e"
    assert _run(monkeypatch, [dom, dom.upper(), dom]) == 1


def test_other_domains_run_together(monkeypatch: pytest.MonkeyPatch) -> None:
    doms = ["6f1ed002-ab5d-42de-b2a0-a21e0c2d4d6e", "7a1ed002-ab5d-42de-b2a0-a21e0c2d4d6e"]
    assert _run(monkeypatch, doms) == 2
