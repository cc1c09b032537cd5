"""Issue 14 end to end, on the dir and GlusterFS shares: what Cinder did not ask for is
refused, and what Cinder stopped waiting for is not done.

The same real deployment as test_cinder_e2e.py (Cinder 29's NfsDriver -> qsnap-api ->
RabbitMQ -> qsnap-agent -> a TCG guest whose disk is the Cinder volume), with an agent whose
Cinder create deadline is tiny (25 s, freeze_timeout 5 s: a create's snapshot may start up
to 15 s after it was accepted) and whose backups read at 1 MiB/s, so a backup holds the disk
busy for long enough. Requests are sent straight to qsnap-api as the volume service would
(the service role), as a caller holding that role could.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cinderclient import exceptions as cinder_exc

from hostagent.rpc import contract as api
from tests.functional.e2e.checks import (
    agent_op,
    api_request,
    check_cinder,
    check_image_files,
    cinder_delete,
    cinder_snapshot,
    ledger,
    live_chain,
)
from tests.functional.e2e.deployment import Deployment, deploy

pytestmark = pytest.mark.functional

CREATE_DEADLINE, FREEZE = 25.0, 5.0
LATEST_START = CREATE_DEADLINE - FREEZE - 5.0  # hostagent.agent: reserve = freeze + 5 s
CTX = {"request_id": "req-e2e-hardening"}
SVC = {"X_Auth_Token": "cinder:svc"}  # noauth: no X-Roles = the service (and admin) role
ASSISTED = "/v2.1/os-assisted-volume-snapshots"


@pytest.fixture(scope="module")
def deployment(
    share: Any, rabbitmq: Any, libvirt_host: Any, guest_image: Any
) -> Iterator[Deployment]:
    conf = {
        "agent": {"create_deadline": CREATE_DEADLINE, "freeze_timeout": FREEZE},
        "backup": {"bandwidth_mib": 1},
    }
    yield from deploy(share, rabbitmq, libvirt_host.connection, guest_image, agent_conf=conf)


# -- helpers ----------------------------------------------------------------------------------
def _http(d: Deployment, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A JSON request as the volume service sends it (the service role)."""
    raw = None if body is None else json.dumps(body).encode()
    return api_request(d, method, path, raw, **SVC)  # type: ignore[no-any-return]


def _delete_path(vol: str, sid: str, to_merge: str | None, target: str | None) -> str:
    info = {"volume_id": vol, "type": "qcow2", "file_to_merge": to_merge}
    info["merge_target_file"] = target
    return f"{ASSISTED}/{sid}?" + urllib.parse.urlencode({"delete_info": json.dumps(info)})


def _share_state(d: Deployment) -> dict[str, tuple[int, int]]:
    """Every file under the volume's directory: (size, mtime in ns)."""
    out = {}
    for root, _dirs, files in os.walk(d.vol_dir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), d.vol_dir)] = (st.st_size, st.st_mtime_ns)
    return out


def _info_bytes(d: Deployment) -> bytes | None:
    path = d.vol_dir / f"volume-{d.volume_id}.info"
    return path.read_bytes() if path.exists() else None


def _cinder_snapshots(d: Deployment) -> dict[str, tuple[str, str]]:
    listed = d.client().volume_snapshots.list(search_opts={"volume_id": d.volume_id})
    return {str(s.id): (s.status, s.progress) for s in listed}


def _final(d: Deployment, op_id: str, timeout: float = 300) -> api.Operation:
    deadline = time.monotonic() + timeout
    while True:
        op = d.agent.get_operation(CTX, op_id)
        if op.state not in (api.OperationState.QUEUED, api.OperationState.RUNNING):
            return op
        assert time.monotonic() < deadline, f"operation {op_id} still {op.state}"
        time.sleep(0.2)


def _live_snapshots(d: Deployment) -> list[str]:
    """Cinder's live snapshots of the volume, oldest first (deepest file first)."""
    info = ledger(d)
    if info is None:
        return []
    names = [n for n, _ in live_chain(d)]
    return sorted((k for k in info if k != "active"), key=lambda k: -names.index(info[k]))


# -- the tests --------------------------------------------------------------------------------
def test_delete_of_an_unknown_snapshot_with_a_real_commit_is_refused(
    deployment: Deployment,
) -> None:
    """Issue 14's probe: a random snapshot id whose delete_info is a valid commit of a real
    snapshot was answered 204 and committed that snapshot away. Now: 404, nothing touched,
    nothing journaled, no callback to Cinder; and ids that the ledger maps to another merge
    are 400. Cinder's own delete of the same snapshot still works (the control)."""
    d, g = deployment, deployment.guest
    vol = d.volume_id
    s1, s2 = cinder_snapshot(d), cinder_snapshot(d)
    names = check_image_files(d, [*_live_snapshots(d)])
    f1, base = f"volume-{vol}.{s1}", names[names.index(f"volume-{vol}.{s1}") + 1]
    assert names[:2] == [f"volume-{vol}.{s2}", f1]
    g.check(["/bin/sh", "-c", "sync"], 60)
    time.sleep(1.0)  # let the last guest flush land before the baseline

    def seen() -> tuple[Any, ...]:
        ops = [op.id for op in d.agent.list_operations(CTX)]
        return _share_state(d), _info_bytes(d), live_chain(d), _cinder_snapshots(d), ops

    before = seen()
    rogue = str(uuid.uuid4())
    probes = [
        ("unknown id, a valid commit of a real snapshot", rogue, f1, base, 404),
        ("the newest snapshot's id with the older one's commit", s2, f1, base, 400),
        ("a known id with a merge its ledger entry does not imply", s1, None, None, 400),
    ]
    for what, sid, to_merge, target, want in probes:
        status, fault = _http(d, "DELETE", _delete_path(vol, sid, to_merge, target))
        assert status == want, (what, status, fault)
        assert fault is not None and len(fault) == 1, (what, fault)
        (detail,) = fault.values()
        assert detail["code"] == want and detail["message"], (what, fault)
    assert seen() == before  # files + mtimes, ledger, live chain, Cinder's statuses, journal
    with pytest.raises(cinder_exc.NotFound):
        d.client().volume_snapshots.get(rogue)

    # the control: Cinder asks for exactly that commit for s1, and it is done
    assert cinder_delete(d, s1) == "commit"
    check_cinder(d, [s2], [s1])
    check_image_files(d, _live_snapshots(d))


def test_create_queued_past_its_deadline_is_failed_without_touching_the_chain(
    deployment: Deployment,
) -> None:
    """A backup holds the disk (1 MiB/s); a create accepted meanwhile waits past its latest
    start. It fails ``DeadlineExpired`` without a step: Cinder's overlay untouched, no status
    sent; once the cancelled backup dropped its checkpoint, chain, ledger and Cinder's
    snapshots are as before. A Cinder create afterwards works."""
    d, g = deployment, deployment.guest
    vol = d.volume_id
    # enough data that the backup outlasts the deadline however the share reports extents
    g.check(["/bin/sh", "-c", "dd if=/dev/urandom of=/data/bulk bs=1M count=24 && sync"], 300)
    live = _live_snapshots(d)
    check_image_files(d, live)
    chain0, info0, cinder0 = live_chain(d), _info_bytes(d), _cinder_snapshots(d)

    backup = d.agent.create_backup(CTX, volume_ids=[vol], instance_uuid=None, incremental=False)
    deadline = time.monotonic() + 120
    while d.agent.get_operation(CTX, backup.id).result["progress"]["cur"] == 0:
        assert time.monotonic() < deadline, "the backup never started reading"
        time.sleep(0.2)

    # Cinder's online create: its overlay pre-created on its active file (the ledger's: the
    # backup's checkpoint, recorded like any snapshot, is the active file now), then the call
    active, fmt = live_chain(d)[0]
    assert (ledger(d) or {}).get("active") == active != chain0[0][0]
    sid = str(uuid.uuid4())
    new_file = f"volume-{vol}.{sid}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", active,
         str(d.vol_dir / new_file)],
        check=True,
    )  # fmt: skip
    overlay0 = os.stat(d.vol_dir / new_file)
    t0 = time.monotonic()
    body = {"snapshot": {"volume_id": vol, "create_info": {
        "snapshot_id": sid, "type": "qcow2", "new_file": new_file}}}  # fmt: skip
    status, answer = _http(d, "POST", ASSISTED, body)
    assert status == 200, answer
    op = agent_op(d, sid, "create_assisted_snapshot")
    assert op.state is api.OperationState.QUEUED

    time.sleep(max(0.0, t0 + LATEST_START + 1.0 - time.monotonic()))
    assert d.agent.get_operation(CTX, op.id).state is api.OperationState.QUEUED
    d.agent.cancel_operation(CTX, backup.id)  # raises NotCancellable if it ended already
    assert _final(d, backup.id).state is api.OperationState.CANCELLED

    done = _final(d, op.id)
    assert done.state is api.OperationState.FAILED
    assert done.error is not None and done.error["code"] == "DeadlineExpired", done.error
    assert done.result["steps"] == []  # no snapshot, no release, no notify
    assert live_chain(d) == chain0
    assert _info_bytes(d) == info0
    after = os.stat(d.vol_dir / new_file)
    assert (after.st_size, after.st_mtime_ns) == (overlay0.st_size, overlay0.st_mtime_ns)
    assert _cinder_snapshots(d) == cinder0
    os.unlink(d.vol_dir / new_file)  # Cinder's overlay: Cinder removes it after its error
    check_image_files(d, live)
    check_cinder(d, live, [])

    # the control: with the disk free, Cinder's own create starts in time and is taken
    s = cinder_snapshot(d)
    check_image_files(d, [*live, s])
    check_cinder(d, [*live, s], [])
