"""Journaled steps with test-only crash injection: die like a kill -9 right after a chosen
journal write or job start. Inert unless :data:`CRASH_ENV` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from hostagent.journal.store import Journal, StepHandle

LOG = logging.getLogger(__name__)

#: TEST ONLY. ``"<step>:<planned|done>"`` makes the agent ``os._exit(137)`` right after that
#: journal write, like a kill -9 at that instant; ``"<step>:job"`` right after the step's
#: block job started (``merge:job``: an owned delete's commit left running in libvirt).
#: Unset (production): no effect at all.
CRASH_ENV = "QSNAP_TEST_CRASH_AT"


def crash_point(step: str, phase: str) -> None:
    """Die now if :data:`CRASH_ENV` names this step and phase (test-only crash injection)."""
    if os.environ.get(CRASH_ENV) == f"{step}:{phase}":
        LOG.error("%s=%s: exiting 137 (test crash injection)", CRASH_ENV, f"{step}:{phase}")
        logging.shutdown()
        os._exit(137)


#: Journals one step: ``with step(op_id, name, data) as handle`` (PLANNED before, DONE after).
StepFn = Callable[[uuid.UUID, str, "dict[str, Any] | None"], AbstractContextManager[StepHandle]]


def crash_pointed(journal: Journal) -> StepFn:
    """``journal.step`` with the test-only crash points right after each journal write.

    The one step wrapper every fresh run uses (assisted, instance snapshots, owned deletes),
    so crash injection reaches each of their steps. Recovery journals through
    ``journal.step`` directly: a restarted agent must not die again at the same point.
    """

    @contextlib.contextmanager
    def step(
        op_id: uuid.UUID, name: str, data: dict[str, Any] | None = None
    ) -> Iterator[StepHandle]:
        with journal.step(op_id, name, data) as handle:
            crash_point(name, "planned")
            yield handle
        crash_point(name, "done")

    return step
