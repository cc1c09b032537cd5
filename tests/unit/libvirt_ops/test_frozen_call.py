"""frozen_call: freeze, action, thaw back to back on one thread; deadlines and failures.

The domain is a recording fake (what was called, on which thread); the watchdog is real and
talks to libvirt's test driver, so its thaw/disarm paths run for real.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt
import pytest

from libvirt_ops import AgentUnavailable, Timeout
from libvirt_ops._quiesce import frozen_call

URI = "test:///default"
TEST_DOM = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's built-in domain


class FakeDom:
    """Records calls; ``freeze_delay``/``thaw_delay`` block, ``freeze_error`` raises."""

    def __init__(
        self,
        *,
        freeze_delay: float = 0.0,
        thaw_delay: float = 0.0,
        freeze_error: str | None = None,
    ) -> None:
        self.calls: list[tuple[str, int]] = []
        self.freeze_delay = freeze_delay
        self.thaw_delay = thaw_delay
        self.freeze_error = freeze_error
        self.thawed = threading.Event()

    def UUIDString(self) -> str:
        return TEST_DOM

    def name(self) -> str:
        return "fake"

    def fsFreeze(self, mounts: list[str] | None, flags: int) -> int:
        self.calls.append(("freeze", threading.get_ident()))
        time.sleep(self.freeze_delay)
        if self.freeze_error:
            raise libvirt.libvirtError(self.freeze_error)
        return len(mounts or [])

    def fsThaw(self, mounts: list[str] | None, flags: int) -> int:
        self.calls.append(("thaw", threading.get_ident()))
        time.sleep(self.thaw_delay)
        self.thawed.set()
        return 2


def _call(dom: FakeDom, action: Any, **kw: float) -> Any:
    args = {"freeze_timeout": 5.0, "max_frozen": 30.0} | kw
    return frozen_call(dom, URI, ("/a", "/b"), action, **args)  # type: ignore[arg-type]


def test_freeze_action_thaw_in_order_on_one_thread() -> None:
    dom = FakeDom()

    def action() -> str:
        dom.calls.append(("action", threading.get_ident()))
        return "snap"

    value, w = _call(dom, action)
    assert value == "snap"
    assert [c for c, _ in dom.calls] == ["freeze", "action", "thaw"]
    assert len({t for _, t in dom.calls}) == 1, "the window crossed threads"
    assert dom.calls[0][1] != threading.get_ident(), "the caller should only wait"
    assert w.frozen == 2 and w.thaw_by == "us"
    ms = w.breakdown_ms()
    assert set(ms) == {"freeze", "to_action", "action", "to_thaw", "thaw", "window"}
    assert w.t_freeze_start <= w.t_frozen <= w.t_action_start <= w.t_action_end <= w.t_thawed
    assert ms["window"] >= ms["freeze"] + ms["action"]


def test_action_error_is_raised_after_the_thaw() -> None:
    dom = FakeDom()

    def action() -> None:
        raise RuntimeError("snapshot refused")

    with pytest.raises(RuntimeError, match="snapshot refused"):
        _call(dom, action)
    assert [c for c, _ in dom.calls] == ["freeze", "thaw"]


def test_freeze_error_maps_to_agent_error_and_skips_the_action() -> None:
    dom = FakeDom(freeze_error="guest agent is not connected")
    ran: list[bool] = []
    with pytest.raises(AgentUnavailable):
        _call(dom, lambda: ran.append(True))
    assert not ran
    assert [c for c, _ in dom.calls] == ["freeze"]  # the watchdog (another process) thawed


def test_late_freeze_times_out_then_is_thawed_without_the_action() -> None:
    dom = FakeDom(freeze_delay=1.0)
    ran: list[bool] = []
    with pytest.raises(Timeout):
        _call(dom, lambda: ran.append(True), freeze_timeout=0.2, max_frozen=60.0)
    assert dom.thawed.wait(10), "a freeze that landed late was not thawed"
    assert not ran, "the snapshot ran after the caller had given up"


def test_hung_thaw_is_left_to_the_watchdog() -> None:
    dom = FakeDom(thaw_delay=3.0)
    value, w = _call(dom, lambda: 7, max_frozen=0.1)
    assert value == 7
    assert w.thaw_by == "watchdog"
