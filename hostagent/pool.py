"""A bounded worker pool that runs at most one operation per disk at a time.

Two block jobs or a snapshot and a merge on one disk would fight over its chain, so work
is queued per key (one key per disk) in FIFO order; different disks run in parallel up to
``workers`` threads. Nothing here knows about libvirt: keys are opaque strings.

The agent runs two: one for Cinder-driven assisted creates and deletes, one for everything
else, so neither can fill the other's workers; a disk's operations in both are serialized by
:class:`hostagent.hypervisor.DiskLocks`, which the jobs that change a disk's chain hold.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

LOG = logging.getLogger(__name__)


class KeyedPool:
    """``submit(key, fn)``: ``fn`` runs after every earlier job with the same key ended."""

    def __init__(self, workers: int, *, name: str = "qsnap-op") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: dict[str, collections.deque[Callable[[], None]]] = {}
        self._closed = False

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is shut down")
            queue = self._queues.get(key)
            if queue is not None:  # a job of this key is running: wait behind it
                queue.append(fn)
                return
            self._queues[key] = collections.deque()
        self._executor.submit(self._run, key, fn)

    def _run(self, key: str, fn: Callable[[], None]) -> None:
        while True:
            try:
                fn()
            except Exception:  # the job journals its own failure; never kill the chain
                LOG.exception("operation on %s raised", key)
            with self._lock:
                queue = self._queues[key]
                if not queue:
                    del self._queues[key]
                    self._idle.notify_all()
                    return
                fn = queue.popleft()

    def wait_idle(self, timeout: float) -> bool:
        """True once no job is queued or running (False if ``timeout`` passed first)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queues, timeout)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
