"""A journal in a temporary file on a clock the test moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.journal.store import Journal
from tests.unit.hostagent.journal.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def journal(tmp_path: Path, clock: FakeClock) -> Journal:
    return Journal(str(tmp_path / "journal.db"), host="hostA", clock=clock)
