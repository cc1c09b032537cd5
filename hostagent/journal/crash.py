"""Test-only crash injection: die like a kill -9 right after a chosen journal write or job start.

Lives apart from recovery so the service can call it without importing recovery (which
imports the service). Inert unless :data:`CRASH_ENV` is set.
"""

from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)

#: TEST ONLY. ``"<step>:<planned|done>"`` makes the agent ``os._exit(137)`` right after that
#: journal write, like a kill -9 at that instant; ``"<step>:job"`` right after the step's
#: block job started (``release_checkpoint:job``: an active commit left running in libvirt).
#: Unset (production): no effect at all.
CRASH_ENV = "QSNAP_TEST_CRASH_AT"


def crash_point(step: str, phase: str) -> None:
    """Die now if :data:`CRASH_ENV` names this step and phase (test-only crash injection)."""
    if os.environ.get(CRASH_ENV) == f"{step}:{phase}":
        LOG.error("%s=%s: exiting 137 (test crash injection)", CRASH_ENV, f"{step}:{phase}")
        logging.shutdown()
        os._exit(137)
