"""``[backup] bandwidth_mib``'s token bucket, on an injected clock: the time it makes a
stream wait, the 0.1 s sleep slices, no burst credit, and a prompt return on cancel."""

from __future__ import annotations

import pytest

from hostagent.backup.repo.engine import RateLimit

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_waits_bytes_over_rate_in_slices_of_at_most_a_tenth() -> None:
    c = Clock()
    rl = RateLimit(2 * MiB, clock=c, sleep=c.sleep)
    rl.take(4 * MiB)  # 2 s of debt
    assert sum(c.sleeps) == pytest.approx(2.0)
    assert max(c.sleeps) <= 0.1 + 1e-9 and len(c.sleeps) >= 20
    c.sleeps.clear()
    rl.take(MiB // 2)  # no credit left over: 0.25 s
    assert sum(c.sleeps) == pytest.approx(0.25)


def test_idle_time_buys_at_most_one_second() -> None:
    c = Clock()
    rl = RateLimit(MiB, clock=c, sleep=c.sleep)
    c.now += 60  # a minute idle
    rl.take(MiB)  # one second of credit: no wait
    assert c.sleeps == []
    rl.take(3 * MiB)  # not 60 s of credit: waits the full 3 s
    assert sum(c.sleeps) == pytest.approx(3.0)


def test_cancel_while_sleeping_returns_promptly() -> None:
    c = Clock()
    rl = RateLimit(MiB, clock=c, sleep=c.sleep)
    rl.take(100 * MiB, cancel=lambda: len(c.sleeps) >= 3)
    assert len(c.sleeps) == 3 and sum(c.sleeps) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        RateLimit(0)
