"""Checkpoint overlays an earlier qsnap left, released ONCE at start, from the journal.

Before issue 15 an incremental backup left ``volume-<vid>.qsnap-bk-<key>`` as the live top
of its volume: a layer Cinder's ledger and Nova's BDM do not name. At the first start of
this version, before recovery judges any chain, the agent reads its journal for backup
operations that named such overlays and, for each volume:

- the overlay is the LIVE TOP of a running guest: a block job a killed agent left is
  settled, then the overlay is merged down (active commit + pivot: its data is the newest,
  nothing is lost) and unlinked once out of the live chain. Cinder's active file is the top
  again, so the ledger, the attachment and Nova's BDM are right again.
- otherwise (guest stopped, or the overlay not in its chain) it is NEVER merged offline: the
  guest may have been restarted on the file below and written since (the old reaper lost
  exactly those writes). It is reported (ERROR log, the marker's result) for an operator.

A marker operation (kind backup, action ``legacy_release``) records the outcome; once it
exists the scan never runs again (a journal without legacy overlays gets no marker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import libvirt

import libvirt_ops as lo
from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from qcow2.naming import DEFAULT_IMAGE_PATTERN, Naming

LOG = logging.getLogger(__name__)

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: Cinder's names plus the legacy overlays (the only naming that accepts them).
LEGACY_NAMING = Naming(
    image_pattern=rf"(?:{DEFAULT_IMAGE_PATTERN})|volume-{_UUID}\.qsnap-bk-{_UUID}"
)
_BK = re.compile(rf"volume-({_UUID})\.qsnap-bk-({_UUID})")
ACTION = "legacy_release"
SETTLE_TIMEOUT = 600.0


def legacy_overlays(journal: Journal) -> dict[tuple[str, str], set[str]]:
    """(domain, volume id) -> the legacy overlay names its backup operations journaled."""
    out: dict[tuple[str, str], set[str]] = {}
    for op in journal.list_operations(kind=OperationKind.BACKUP):
        req = op.request
        if "action" in req:
            continue
        names = {req.get("overlay"), req.get("old_checkpoint")}
        for n in names:
            m = _BK.fullmatch(n) if isinstance(n, str) else None
            if m is not None and m.group(1) == req.get("volume_id"):
                out.setdefault((str(req.get("domain")), m.group(1)), set()).add(m.group(0))
    return out


def release_legacy(
    journal: Journal, conn: lo.Connection, roots: Sequence[str]
) -> dict[str, Any] | None:
    """Run the once-only release (see the module docstring); its result, None if done."""
    markers = journal.list_operations(kind=OperationKind.BACKUP, lock=ACTION)
    if any(m.state.is_final for m in markers):
        return None
    found = legacy_overlays(journal)
    if not found:  # a journal of this version only: nothing to do, no marker needed
        return None
    if markers:  # a release killed midway: run it again (it re-reads the live chains)
        op = markers[0]
    else:
        op = journal.begin(OperationKind.BACKUP, {"action": ACTION}, locks=[ACTION]).operation
    released: list[str] = []
    left: dict[str, str] = {}
    for (domain, vid), names in sorted(found.items()):
        try:
            released += _release_volume(conn, domain, vid, names, list(roots), left)
        except Exception as exc:  # one volume's trouble never stops the others
            for n in names:
                left[n] = f"{type(exc).__name__}: {exc}"
    for name, why in left.items():
        LOG.error("legacy checkpoint overlay %s left for an operator: %s", name, why)
    result = {"released": released, "left": left}
    journal.finish(op.id, OperationState.SUCCEEDED, result=result)
    return result


def _release_volume(
    conn: lo.Connection,
    domain: str,
    vid: str,
    names: set[str],
    roots: list[str],
    left: dict[str, str],
) -> list[str]:
    try:
        dom = conn.lookup(domain)
        running = bool(dom.isActive())
        disk = lo.find_disk(dom, volume_id=vid)
    except (libvirt.libvirtError, lo.LibvirtOpsError) as exc:
        LOG.info("legacy overlays %s of %s: domain or disk gone (%s)", sorted(names), vid, exc)
        return []
    share = os.path.dirname(disk.source)
    released: list[str] = []
    if running:
        rts = roots or [share]
        lo.settle_block_job(
            conn, dom, disk.target, timeout=SETTLE_TIMEOUT, roots=rts, naming=LEGACY_NAMING
        )
        # a stack of them (a backup killed between its publish and its merge left two)
        for _ in range(len(disk.chain)):
            top = os.path.basename(lo.resolve_disk(dom, disk.target).source)
            m = _BK.fullmatch(top)
            if m is None or m.group(1) != vid:
                break
            lo.active_commit(conn, dom, disk.target, roots=rts, naming=LEGACY_NAMING)
            live = [os.path.basename(x.path) for x in lo.resolve_disk(dom, disk.target).chain]
            if top in live:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(share, top))
            released.append(top)
    for n in sorted(names - set(released)):
        if os.path.lexists(os.path.join(share, n)):
            how = "not the live top" if running else "not running: never merged offline"
            left[n] = f"domain {domain} {how} (a restart may have written below it)"
    return released
