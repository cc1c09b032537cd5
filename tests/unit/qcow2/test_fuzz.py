"""A short run of the qcow2 fuzz targets; the long run is documented in tests/fuzz/."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.fuzz_qcow2 import TARGETS, exercise, templates


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.__name__)
def test_fuzz_only_qcow2_errors(target: Callable[[], None]) -> None:
    settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(target)()


def test_harness_can_fail() -> None:
    """The harness lets foreign exceptions through, so a pass above means something."""
    with pytest.raises(TypeError):
        exercise(None)  # type: ignore[arg-type]
    assert set(templates()) == {"v3", "v2", "zlib", "zstd", "extl2"}
