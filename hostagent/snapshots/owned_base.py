"""What instance snapshots and owned deletes share: their parts, the step wrapper, checks.

Both kinds are carried out entirely by the agent (see :mod:`hostagent.snapshots.owned`); they share
the journal, pool, queue and hypervisor, the per-disk locks and one consistency check of a
volume's chain against its ``.info`` ledger.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

from hostagent.cinder.outbox import NotifyQueue
from hostagent.hypervisor import DiskLocks, Hypervisor, Located, chain_names
from hostagent.journal import store as jn
from hostagent.journal.crash import StepFn
from hostagent.journal.model import StepName
from hostagent.nova_records import NovaRecords
from hostagent.pool import KeyedPool
from hostagent.rpc import contract as api
from hostagent.rpc.nova_side import BdmState
from hostagent.rpc.wire_errors import Rule, wire_errors
from qcow2 import Ledger, Qcow2Error, read_ledger

LOG = logging.getLogger(__name__)


def checked_ledger(directory: str, volume_id: str) -> Ledger | None:
    """The volume's ledger (None: none yet); one we refuse to parse is a typed refusal."""
    refused = Rule(
        Qcow2Error, api.InvalidRequest, lambda e: f"ledger of volume {volume_id} refused: {e}"
    )
    with wire_errors(refused):
        return read_ledger(directory, volume_id)


class OwnedBase:
    """The parts every agent-owned operation uses; ``step`` journals (and crash-points)."""

    def __init__(
        self,
        journal: jn.Journal,
        hv: Hypervisor,
        queue: NotifyQueue,
        pool: KeyedPool,
        locks: DiskLocks,
        *,
        roots: list[str],
        step: StepFn,
        nova: NovaRecords | None = None,
    ) -> None:
        self._j, self._hv, self._q, self._pool = journal, hv, queue, pool
        self._locks, self._roots, self._step = locks, roots, step
        self._nova = nova or NovaRecords()

    def _nova_guard(self, domain_uuid: str) -> bool:
        """Whether the change must end with Nova's BDM refreshed (raises: refused)."""
        return self._nova.guard(domain_uuid, self._hv.nova_managed(domain_uuid))

    def _nova_refresh(
        self, op_id: uuid.UUID, instance_uuid: str, expected: dict[str, BdmState]
    ) -> None:
        """Journaled: Nova re-reads Cinder's attachments; each BDM must name ``expected``."""
        data = {
            "instance": instance_uuid,
            "expected": {k: v.to_wire() for k, v in expected.items()},
        }
        with self._step(op_id, StepName.NOVA_REFRESH, data) as st:
            st.data["bdm"] = self._nova.refresh(instance_uuid, expected)

    # -- validation (touches nothing) -----------------------------------------------------
    def _checked(self, where: Located) -> list[str]:
        """The chain names; the ledger, if any, must agree that the top is active."""
        names = chain_names(where, self._roots)
        vid = str(where.disk.serial).lower()
        ledger = checked_ledger(os.path.dirname(where.disk.source), vid)
        if ledger is not None and ledger.active != names[0]:
            raise api.InvalidRequest(
                f"ledger of {vid} says {ledger.active!r} is active, the chain's top is {names[0]!r}"
            )
        return names

    def _locked(self, keys: list[str], fn: Callable[..., None], *args: Any) -> None:
        with self._locks.hold(keys):
            fn(*args)
