"""What a Cinder-assisted request may be, given the volume's ``.info`` ledger; and its deadline.

Cinder's remotefs driver (cinder 29, ``volume/drivers/remotefs.py``) computes every name it
sends from its ledger, so a request is checked against the ledger EXACTLY as the driver
computes it, before anything is touched or journaled (and again by the worker):

- create (``_create_snapshot`` / ``_get_new_snap_path``): ``new_file`` is
  ``volume-<volume id>.<snapshot id>``; the snapshot id is not a key of the ledger; a ledger
  that exists is readable and names the live top as ``active``. No ledger is fine: Cinder
  writes it on the first snapshot.
- delete (``_delete_snapshot`` / ``_delete_snapshot_online``): the id is a key of the ledger
  (else :class:`~hostagent.rpc.contract.SnapshotNotFound`: Cinder never asks Nova for one
  that is not; it returns early); ``snapshot_file = ledger[id]`` is in the live chain and has
  a backing file ``base_file`` (without one Cinder deletes the snapshot itself); then

  - ``snapshot_file`` is the active file: a pull. ``base_id`` = the ledger key whose file is
    ``base_file``; none -> ``file_to_merge = None`` (the whole base pulled in: a flatten),
    else ``file_to_merge`` = ``base_file``'s backing file; ``merge_target_file = None``.
  - otherwise a commit: ``file_to_merge = snapshot_file``, ``merge_target_file = base_file``.

A mismatch is :class:`~hostagent.rpc.contract.InvalidRequest` (400 at qsnap-api).

Deadlines (:class:`Deadlines`): Cinder polls its database for the agent's status update and
gives up 600 s (create) or 7200 s (delete) after the call returned, then marks the snapshot
``error`` / ``error_deleting`` itself and refuses any later update (its
``os-update_snapshot_status`` allows only creating -> creating|available|error and
deleting -> deleting|error_deleting). So a job is not STARTED once that wait is over (a
create not within ``create_reserve`` of it: the snapshot and its report must land while
Cinder still looks), it fails without touching the chain and sends NOTHING: Cinder's own
timeout already tells the truth (nothing was done), and an update it refuses would be
resent every 300 s forever by the outbox. A job that started in time runs to its end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hostagent.errors import QsnapAgentError
from hostagent.rpc import contract as api
from hostagent.rpc.wire_errors import Rule, wire_errors
from qcow2 import CINDER, Ledger, LedgerError, read_ledger
from qcow2.naming import snapshot_file_name

#: remotefs ``_create_snapshot_online``: ``timeout = 600``.
CINDER_CREATE_WAIT = 600.0
#: remotefs ``_nova_assisted_vol_snap_delete``: ``timeout = 7200``.
CINDER_DELETE_WAIT = 7200.0


def cinder_ledger(volume_dir: str, volume_id: str) -> Ledger | None:
    """The volume's ledger, or None when there is none; an unusable one is refused (400).

    An empty file is refused too: Cinder's ``json.loads`` fails on it, so Cinder cannot
    have computed the request from it.
    """
    refused = Rule(LedgerError, api.InvalidRequest, lambda e: f"the volume's ledger: {e}")
    with wire_errors(refused):
        return read_ledger(volume_dir, volume_id, naming=CINDER)


def _consistent(ledger: Ledger, names: list[str], volume_id: str) -> None:
    if ledger.active != names[0]:
        raise api.InvalidRequest(
            f"the ledger of volume {volume_id} names {ledger.active!r} as active but the live "
            f"top is {names[0]!r}: Cinder's view and the disk disagree"
        )


def check_create(ledger: Ledger | None, names: list[str], req: api.CreateSnapshotRequest) -> None:
    """``req`` is what Cinder sends for a new snapshot of this volume (see the module doc)."""
    want = snapshot_file_name(req.volume_id, req.snapshot_id)
    if req.new_file != want:
        raise api.InvalidRequest(
            f"new_file {req.new_file!r} is not Cinder's file for snapshot {req.snapshot_id} "
            f"of volume {req.volume_id} ({want!r})"
        )
    if ledger is None:  # no snapshot yet: Cinder writes .info on the first one
        return
    if req.snapshot_id in ledger.snapshots:
        raise api.InvalidRequest(
            f"snapshot {req.snapshot_id} is already in the ledger of volume {req.volume_id}"
        )
    _consistent(ledger, names, req.volume_id)


def cinder_delete_info(
    ledger: Ledger | None, names: list[str], volume_id: str, snapshot_id: str
) -> tuple[str | None, str | None]:
    """``(file_to_merge, merge_target_file)`` remotefs sends to delete ``snapshot_id`` online.

    ``names`` is the live chain, top first, as Cinder knows it (its files' backing names).
    """
    if ledger is None or snapshot_id not in ledger.snapshots:
        raise api.SnapshotNotFound(
            f"snapshot {snapshot_id} is not in the ledger of volume {volume_id}"
        )
    _consistent(ledger, names, volume_id)
    snapshot_file = ledger.snapshots[snapshot_id]
    if snapshot_file not in names:
        raise api.InvalidRequest(
            f"the ledger maps snapshot {snapshot_id} to {snapshot_file!r}, which is not in "
            f"the live chain {names}"
        )
    at = names.index(snapshot_file)
    below = names[at + 1 :]
    if not below:  # remotefs: "No backing file found": deleted by Cinder, Nova never asked
        raise api.InvalidRequest(
            f"{snapshot_file!r} of snapshot {snapshot_id} has no backing file: nothing to merge"
        )
    base_file = below[0]
    if snapshot_file != ledger.active:
        return snapshot_file, base_file  # blockCommit snapshot_file into base_file
    base_id = next((s for s, f in ledger.snapshots.items() if f == base_file), None)
    if base_id is None:
        return None, None  # the oldest snapshot: the whole base pulled into the active file
    return (below[1] if len(below) > 1 else None), None  # pull base_file into the active


def check_delete(ledger: Ledger | None, names: list[str], req: api.DeleteSnapshotRequest) -> None:
    """``req``'s delete_info is exactly the merge the ledger implies for its snapshot id."""
    want = cinder_delete_info(ledger, names, req.volume_id, req.snapshot_id)
    if (req.file_to_merge, req.merge_target_file) != want:
        raise api.InvalidRequest(
            f"delete_info (file_to_merge={req.file_to_merge!r}, merge_target_file="
            f"{req.merge_target_file!r}) is not the merge the ledger implies for snapshot "
            f"{req.snapshot_id}: (file_to_merge={want[0]!r}, merge_target_file={want[1]!r})"
        )


# -- deadlines ------------------------------------------------------------------------------
class DeadlineExpired(QsnapAgentError):
    """A Cinder-driven job that was not started before Cinder stopped waiting for it."""


@dataclass(frozen=True)
class Deadlines:
    """Seconds after acceptance until Cinder stops waiting (``[agent] create_deadline`` and
    ``delete_deadline``); ``create_reserve``: a create's snapshot must start at least this
    long before its deadline (the guest is frozen at most ``freeze_timeout``, then the report
    must reach Cinder)."""

    create: float = CINDER_CREATE_WAIT
    delete: float = CINDER_DELETE_WAIT
    create_reserve: float = 15.0

    def __post_init__(self) -> None:
        if self.create <= self.create_reserve:
            raise ValueError(
                f"[agent] create_deadline ({self.create:g} s) leaves no time to start a "
                f"create: it must exceed freeze_timeout + 5 s ({self.create_reserve:g} s)"
            )

    def check(self, what: str, accepted: float, now: float | None = None) -> None:
        """Raise :class:`DeadlineExpired` when ``what`` (create/delete) may no longer start."""
        now = time.time() if now is None else now
        wait = self.create if what == "create" else self.delete
        latest = accepted + wait - (self.create_reserve if what == "create" else 0.0)
        if now >= latest:
            raise DeadlineExpired(
                f"{what} not started {now - accepted:.1f} s after it was accepted (latest "
                f"start {latest - accepted:.1f} s; Cinder waits {wait:.0f} s): not started, "
                "chain untouched, no status sent (Cinder's own timeout reports it)"
            )
