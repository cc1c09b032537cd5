"""What the journal's tests share: ids, a create request, a clock the test moves."""

from __future__ import annotations

SNAP = "aaaaaaaa-1111-4222-8333-444444444444"
VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
CREATE = {"volume_id": VOL, "snapshot_id": SNAP, "new_file": f"volume-{VOL}.{SNAP}"}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
