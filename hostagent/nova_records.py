"""Nova's view of the chains the agent changes by itself: checked before, refreshed after.

Nova rebuilds a guest's disks from its block-device mapping (BDM) on a hard reboot, a start
or a live migration, and refreshes a BDM only after its own assisted snapshots. So a chain
change the agent makes on a Nova guest by itself (instance snapshot, delete of its own
snapshot) must end with the BDM naming the new live top, or the next reboot opens a backing
file and its writes corrupt every overlay above it.

- :meth:`NovaRecords.guard`, before anything is journaled or touched: a Nova guest needs
  ``[nova] enabled`` and qsnap's driver in nova-compute answering; otherwise the request is
  refused with :class:`~hostagent.rpc.contract.NovaUnavailable` (safe default: a chain change
  Nova would not learn of is never made).
- :meth:`NovaRecords.refresh`, after Cinder's records were updated: Nova re-reads Cinder's
  attachment into the BDM; the answer must name exactly the live top and its real format, or
  the operation fails with :class:`RecordsStale` (it is not reported done).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hostagent.errors import QsnapAgentError
from hostagent.rpc import contract as api
from hostagent.rpc.nova_side import BdmState, NovaSideError


class NovaSide(Protocol):
    """The part of :class:`hostagent.rpc.nova_side.NovaSideAPI` the agent uses."""

    def ping(self, timeout: float | None = None) -> dict[str, Any]: ...
    def refresh_volume(self, instance_uuid: str, volume_id: str) -> BdmState: ...


class RecordsStale(QsnapAgentError):
    """After the refresh Nova's BDM does not name the live top (or Nova could not be asked)."""


class NovaRecords:
    """The agent's one door to Nova's side; ``side`` None means ``[nova] enabled = false``."""

    def __init__(
        self,
        side: NovaSide | None = None,
        *,
        ping_timeout: float = 5.0,
        attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``attempts``: tries of a refresh Nova's side did not answer (1 s, 2 s, ... apart):
        the chain already changed, so a blip must not leave the BDM stale."""
        self._side = side
        self._ping_timeout = ping_timeout
        self._attempts = max(1, attempts)
        self._sleep = sleep

    @property
    def enabled(self) -> bool:
        return self._side is not None

    def guard(self, domain_uuid: str, nova_managed: bool) -> bool:
        """Whether the change must end with :meth:`refresh`; raises when it must not start."""
        if not nova_managed:
            return False
        if self._side is None:
            raise api.NovaUnavailable(
                f"domain {domain_uuid} is managed by Nova and this agent has [nova] enabled = "
                "false: Nova would keep the old file in its block-device mapping; refused"
            )
        try:
            self._side.ping(self._ping_timeout)
        except NovaSideError as exc:
            raise api.NovaUnavailable(
                f"domain {domain_uuid} is managed by Nova and Nova's side cannot be reached "
                f"({exc}); refused before touching anything"
            ) from exc
        return True

    def refresh(self, instance_uuid: str, expected: Mapping[str, BdmState]) -> dict[str, Any]:
        """Nova re-reads each volume's attachment; every answer must equal ``expected``."""
        if self._side is None:
            raise RecordsStale("[nova] enabled is false: Nova's block-device mapping not refreshed")
        seen: dict[str, Any] = {}
        for volume_id, want in expected.items():
            got = self._refresh_one(instance_uuid, volume_id)
            seen[volume_id] = got.to_wire()
            if got != want:
                raise RecordsStale(
                    f"volume {volume_id}: after the refresh Nova's block-device mapping names "
                    f"{got.name!r} ({got.format}), the live top is {want.name!r} ({want.format})"
                )
        return seen

    def _refresh_one(self, instance_uuid: str, volume_id: str) -> BdmState:
        assert self._side is not None
        for n in range(self._attempts):
            try:
                return self._side.refresh_volume(instance_uuid, volume_id)
            except NovaSideError as exc:
                if n + 1 == self._attempts:
                    raise RecordsStale(f"volume {volume_id}: {exc}") from exc
                self._sleep(float(1 << n))
        raise AssertionError("unreachable")
