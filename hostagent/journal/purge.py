"""The periodic journal purge: old final operations go, so the journal does not grow forever.

:class:`JournalPurger` runs :meth:`hostagent.journal.store.Journal.prune` on its own thread,
once at start and then every ``interval`` seconds, for operations last touched more than
``age`` seconds ago ([journal] ``purge_age_days``; 0 disables it). What is still owed work is
never purged (unfinished operations, operations with an undelivered notice; see ``prune``).
A failed pass is logged and retried at the next interval; it never stops the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from hostagent.journal.model import Pruned
from hostagent.journal.store import Journal

__all__ = ["JournalPurger"]

LOG = logging.getLogger(__name__)

DAY = 86400.0


class JournalPurger:
    """Purges ``journal`` of final operations older than ``age`` seconds, every ``interval``."""

    def __init__(
        self,
        journal: Journal,
        *,
        age: float,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self.age = age
        self.interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.age > 0

    def purge_once(self) -> Pruned:
        """One pass now; logs what it removed (and what it kept because a notice is owed)."""
        cutoff = self._clock() - self.age
        pruned = self._journal.prune(cutoff, stop=self._stop.is_set)
        before = datetime.fromtimestamp(cutoff, UTC).isoformat(timespec="seconds")
        if pruned.operations or pruned.notices:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(pruned.by_kind.items()))
            LOG.info(
                "journal purge: removed %d final operations (%s) with %d steps and %d "
                "delivered notices, all last touched before %s",
                pruned.operations,
                kinds or "none",
                pruned.steps,
                pruned.notices,
                before,
            )
        else:
            LOG.debug("journal purge: nothing last touched before %s", before)
        if pruned.kept_owed:
            LOG.info(
                "journal purge: kept %d old final operations whose notices are undelivered",
                pruned.kept_owed,
            )
        return pruned

    def start(self) -> None:
        """Start the purge thread (a no-op when disabled or already started)."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="qsnap-journal-purge", daemon=True)
        self._thread.start()
        LOG.info(
            "journal purge every %.0f s of final operations older than %.4g days",
            self.interval,
            self.age / DAY,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; a pass under way ends its current batch first."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                LOG.warning("journal purge thread still running after %.0f s", timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.purge_once()
            except Exception:
                LOG.exception("journal purge pass failed; retried in %.0f s", self.interval)
            self._stop.wait(self.interval)
