"""Issue 5 end to end: a real Cinder drives qsnap exactly as it drives Nova.

Cinder 29's NfsDriver (its ``[nova] endpoint`` = a qsnap-api process) snapshots and deletes
an attached volume while the guest writes; qsnap-api routes over RabbitMQ to a qsnap-agent
process that works on the live domain and reports back to Cinder. After every step the
snapshot statuses, the ledger, the files, the live XML and the guest's data must agree
(tests/functional/e2e/checks.py). Runs on a plain directory and on a GlusterFS FUSE mount.
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
from typing import Any

import pytest

from testbed.cinder import REPO
from tests.functional.e2e.checks import (
    GuestData,
    api_request,
    check_cinder,
    check_image_files,
    cinder_delete,
    cinder_snapshot,
    ledger,
)
from tests.functional.e2e.deployment import Deployment

pytestmark = pytest.mark.functional


def _verify(d: Deployment, data: GuestData, live: list[str], gone: list[str]) -> list[str]:
    check_cinder(d, live, gone)
    names = check_image_files(d, live)
    data.check()
    return names


def test_snapshots_while_writing_then_deletes_in_both_orders(deployment: Deployment) -> None:
    d, g = deployment, deployment.guest
    vol = f"volume-{d.volume_id}"
    data = GuestData(g)
    data.add_file()
    g.start_writers(20, 1, ["/data"])
    _verify(d, data, [], [])

    # three snapshots one after another while the writer runs; data lands in every layer
    first: list[str] = []
    for _ in range(3):
        first.append(cinder_snapshot(d))
        data.add_file()
        names = _verify(d, data, first, [])
    assert names == [f"{vol}.{first[2]}", f"{vol}.{first[1]}", f"{vol}.{first[0]}", vol]

    # newest, middle, oldest: each is then the newest, so Cinder asks for pulls into the
    # active file, the last one without a base (a full flatten; Cinder drops the volume file)
    modes = []
    for i, sid in enumerate(reversed(first)):
        modes.append(cinder_delete(d, sid))
        data.add_file()
        names = _verify(d, data, first[: 2 - i], first[2 - i :])
    assert modes == ["pull", "pull", "flatten"]
    assert names == [f"{vol}.{first[2]}"]

    # a fresh chain on the flattened qcow2, deleted oldest first: commits, then a flatten
    second: list[str] = []
    for _ in range(3):
        second.append(cinder_snapshot(d))
        data.add_file()
        _verify(d, data, second, first)
    modes = []
    for i, sid in enumerate(second):
        modes.append(cinder_delete(d, sid))
        data.add_file()
        names = _verify(d, data, second[i + 1 :], first + second[: i + 1])
    assert modes == ["commit", "commit", "flatten"]
    assert names == [f"{vol}.{second[2]}"]
    g.stop_writers()
    data.check()
    assert data.log is not None and data.log.count > 0
    assert g.agent("guest-fsfreeze-status") == "thawed"


def _share_state(d: Deployment) -> dict[str, tuple[int, int]]:
    """Every file under the volume's directory: (size, mtime in ns)."""
    out = {}
    for root, _dirs, files in os.walk(d.vol_dir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), d.vol_dir)] = (st.st_size, st.st_mtime_ns)
    return out


def test_bad_input_through_the_api_is_4xx_and_changes_nothing(deployment: Deployment) -> None:
    d, g = deployment, deployment.guest
    vol, snap = d.volume_id, cinder_snapshot(d)  # a 2-file chain: [volume-V.S, old active]
    names = check_image_files(d, [snap])
    g.check(["/bin/sh", "-c", "sync"], 60)
    time.sleep(1.0)  # let the last guest flush land before the baseline
    before_files, before_ledger = _share_state(d), ledger(d)
    ctx = {"request_id": "req-e2e-bad"}
    before_ops = [op.id for op in d.agent.list_operations(ctx)]
    svc = {"X_Auth_Token": "cinder:svc"}
    post = "/v2.1/os-assisted-volume-snapshots"
    other = str(uuid.uuid4())

    def create(info: dict[str, Any], **extra: Any) -> bytes:
        return json.dumps({"snapshot": {"volume_id": vol, "create_info": info, **extra}}).encode()

    def info(new_file: str, **extra: Any) -> dict[str, Any]:
        return {"snapshot_id": other, "type": "qcow2", "new_file": new_file, **extra}

    def delete(to_merge: str | None, target: str | None) -> str:
        di = {"volume_id": vol, "type": "qcow2", "file_to_merge": to_merge}
        di["merge_target_file"] = target
        return f"{post}/{other}?" + urllib.parse.urlencode({"delete_info": json.dumps(di)})

    ok_name = f"volume-{vol}.{other}"
    cases: list[tuple[str, str, str, bytes | None, dict[str, str], int]] = [
        ("malformed JSON", "POST", post, b'{"snapshot": {', svc, 400),
        ("unknown field", "POST", post, create(info(ok_name, color="red")), svc, 400),
        ("unknown top field", "POST", post, create(info(ok_name), extra=1), svc, 400),
        ("new_file with /", "POST", post, create(info(f"sub/{ok_name}")), svc, 400),
        ("new_file with ..", "POST", post, create(info(f"../{ok_name}")), svc, 400),
        ("new_file not pre-created", "POST", post, create(info(ok_name)), svc, 400),
        ("merge of a file not in the chain", "DELETE", delete(ok_name, names[-1]), None, svc, 400),
        ("target not in the chain", "DELETE", delete(names[0], f"volume-{other}"), None, svc, 400),
        ("pull of a file not in the chain", "DELETE", delete(ok_name, None), None, svc, 400),
        ("oversized body", "POST", post, create(info(ok_name, id="x" * 70000)), svc, 413),
        ("no token", "POST", post, create(info(ok_name)), {}, 401),
        ("no token delete", "DELETE", delete(names[0], names[-1]), None, {}, 401),
        ("wrong role", "POST", post, create(info(ok_name)), {**svc, "X_Roles": "member"}, 403),
        ("wrong role delete", "DELETE", delete(names[0], names[-1]), None,
         {**svc, "X_Roles": "member"}, 403),
    ]  # fmt: skip
    for what, method, path, body, headers, want in cases:
        status, fault = api_request(d, method, path, body, **headers)
        assert status == want, (what, status, fault)
        assert fault is not None and len(fault) == 1, (what, fault)
        (detail,) = fault.values()
        assert detail["code"] == want and detail["message"], (what, fault)

    assert _share_state(d) == before_files
    assert ledger(d) == before_ledger
    assert [op.id for op in d.agent.list_operations(ctx)] == before_ops
    check_cinder(d, [snap], [])
    # and the deployment still works: Cinder deletes the snapshot normally (a flatten)
    assert cinder_delete(d, snap) == "flatten"
    check_cinder(d, [], [snap])
    check_image_files(d, [])


def _qsnap_cli(d: Deployment, *args: str) -> Any:
    """The admin CLI as an operator runs it against a noauth qsnap-api; its JSON output."""
    argv = [str(REPO / ".venv" / "bin" / "qsnap"), "--os-auth-type", "none"]
    argv += ["--os-endpoint", d.api_url, *args, "-f", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, f"{argv}: rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def test_instance_snapshot_from_cli_is_available_in_cinder_which_deletes_it(
    deployment: Deployment,
) -> None:
    """The agent takes these itself (Cinder records them through our Cinder extension);
    Cinder must then treat them as its own: available, and deleted through qsnap-api."""
    d, g = deployment, deployment.guest
    data = GuestData(g, records=False)  # the writer belongs to the first test
    data.add_file()
    taken: list[str] = []
    for _ in range(2):
        body = _qsnap_cli(d, "snapshot", "create", "--instance", g.uuid, "--wait")
        op = body["operation"]
        assert op["state"] == "succeeded", op
        assert op["result"]["quiesced"] is True, op
        (snap,) = op["result"]["snapshots"]
        assert snap["volume_id"] == d.volume_id
        taken.append(snap["snapshot_id"])
        data.add_file()
        names = _verify(d, data, taken, [])
    listed = d.client().volume_snapshots.list(search_opts={"volume_id": d.volume_id})
    assert {s.id: s.status for s in listed} == {sid: "available" for sid in taken}
    assert names[:2] == [f"volume-{d.volume_id}.{taken[1]}", f"volume-{d.volume_id}.{taken[0]}"]
    # Cinder's normal delete: the older one is committed down, the newer one flattened
    assert cinder_delete(d, taken[0]) == "commit"
    _verify(d, data, taken[1:], taken[:1])
    assert cinder_delete(d, taken[1]) == "flatten"
    _verify(d, data, [], taken)
