"""The thaw watchdog's protocol against libvirt's test driver (thaw counts come back)."""

from __future__ import annotations

import selectors

import pytest

from libvirt_ops import Timeout
from libvirt_ops._thaw_watchdog import ThawWatchdog

URI = "test:///default"
TEST_DOM = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's built-in domain


def _next_line(dog: ThawWatchdog, wait: float = 30.0) -> str:
    out = dog.proc.stdout
    assert out is not None
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        assert sel.select(wait), "watchdog said nothing"
    return out.readline().strip()


def test_done_exits_without_thawing() -> None:
    dog = ThawWatchdog(URI, TEST_DOM)
    dog.arm(60)
    dog.done()
    assert dog.proc.returncode == 0
    # communicate() consumed the final words; "disarmed" means no thaw was attempted


def test_deadline_thaws_on_its_own() -> None:
    dog = ThawWatchdog(URI, TEST_DOM)
    dog.arm(0.2)
    assert _next_line(dog).startswith("thawed")
    assert dog.proc.wait(30) == 0


def test_eof_thaws_at_once() -> None:
    dog = ThawWatchdog(URI, TEST_DOM)
    dog.arm(3600)
    assert dog.proc.stdin is not None
    dog.proc.stdin.close()  # what the kernel does when our process dies
    assert _next_line(dog).startswith("thawed")
    assert dog.proc.wait(30) == 0


def test_thaw_now_reports_the_thaw() -> None:
    dog = ThawWatchdog(URI, TEST_DOM)
    dog.arm(3600)
    assert dog.thaw_now().isdigit()  # last word of "thawed N"


def test_unknown_domain_fails_before_any_freeze() -> None:
    with pytest.raises(Timeout):
        ThawWatchdog(URI, "00000000-0000-0000-0000-000000000000")
