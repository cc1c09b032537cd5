"""Issue 14: the Cinder extension finalizes and deletes only records it made itself.

api_ext.cinder_extension runs inside Cinder, whose packages live in ``.venv-cinder`` only,
so the checks run there in a child interpreter (no Cinder service, no database): the
controller's actions, undecorated, over fake snapshot objects whose ``conditional_update``
behaves as the database's. The real-Cinder version is in
tests/functional/api_ext/test_cinder_extension.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
PYTHON = REPO / ".venv-cinder" / "bin" / "python"

_PROBE = r"""
import json, types, webob
import api_ext.cinder_extension as ce

SID = "0d0d0d0d-0d0d-4d0d-8d0d-0d0d0d0d0d0d"
VID = "0e0e0e0e-0e0e-4e0e-8e0e-0e0e0e0e0e0e"
calls = []


class Snap:
    def __init__(self, provider_id, status="creating", metadata=None):
        self.id, self.volume_id, self.provider_id = SID, VID, provider_id
        self.status, self.metadata, self.deleted = status, dict(metadata or {}), False
        self.project_id, self.volume_size, self.volume_type_id = "p", 1, None
        self.updates, self.destroyed = [], False

    def conditional_update(self, values, expected):  # as the database: all must match
        self.updates.append(sorted(expected))
        for key, want in expected.items():
            have = getattr(self, key)
            if not (have in want if isinstance(want, (list, tuple)) else have == want):
                return False
        for key, value in values.items():
            setattr(self, key, value)
        return True

    def destroy(self):
        self.destroyed = True

    def state(self):
        return {"status": self.status, "provider_id": self.provider_id,
                "metadata": self.metadata, "destroyed": self.destroyed}


class Quotas:
    def reserve(self, *a, **k):
        calls.append("reserve")
        return ["r"]

    def commit(self, *a, **k):
        calls.append("commit")

    def rollback(self, *a, **k):
        calls.append("rollback")

    def add_volume_type_opts(self, *a, **k):
        pass


current = {}
ce._authorize = lambda ctx: None
ce.QUOTAS = Quotas()
ce.objects = types.SimpleNamespace(  # no database: the objects the actions look up
    Snapshot=types.SimpleNamespace(get_by_id=lambda ctx, sid, *a, **k: current["snap"]),
    Volume=types.SimpleNamespace(get_by_id=lambda ctx, vid, *a, **k: current["volume"]),
)
ce.cinder_connection = types.SimpleNamespace(  # attachment/format upkeep: functional tests
    on_create=lambda *a: None, on_available=lambda *a: {}, on_deleted=lambda *a: {},
)
ce.QsnapSnapshotMetadataController._reserve_opts = staticmethod(lambda *a: {"snapshots": -1})
ce.db = types.SimpleNamespace(
    volume_glance_metadata_delete_by_snapshot=lambda *a: calls.append("glance"),
    snapshot_create=lambda ctx, values: calls.append(("create", values.get("provider_id"))),
)
ctrl = ce.QsnapSnapshotMetadataController()
ctrl._view_builder = types.SimpleNamespace(detail=lambda req, s: {"snapshot": s.state()})
req = types.SimpleNamespace(environ={"cinder.context": types.SimpleNamespace(project_id="p")})
finalize = ce.QsnapSnapshotMetadataController._finalize.__wrapped__
delete = ce.QsnapSnapshotMetadataController._delete_metadata.__wrapped__
create = ce.QsnapSnapshotMetadataController._create_metadata.__wrapped__


def run(action, snap):
    current["snap"] = snap
    del calls[:]
    before = snap.state()
    try:
        if action == "finalize":
            out = finalize(ctrl, req, SID, {"finalize-snapshot-metadata": {"status": "available"}})
            code = 200
        else:
            out = delete(ctrl, req, SID, {"snapshot-delete-metadata": {}})
            code = out.status_int
        message = ""
    except webob.exc.HTTPException as exc:
        code, message = exc.code, exc.explanation
    return {"code": code, "message": message, "before": before, "after": snap.state(),
            "updates": snap.updates, "calls": calls[:]}


out = {
    "mark": ce.MARK,
    "finalize_cinder": run("finalize", Snap(None)),
    "finalize_forged_metadata": run("finalize", Snap(None, metadata={"qsnap": ce.MARK})),
    "finalize_driver_id": run("finalize", Snap("backend-lun-7")),
    "delete_cinder": run("delete", Snap(None, status="available")),
    "delete_cinder_error": run("delete", Snap("", status="error")),
    "finalize_ours": run("finalize", Snap(ce.MARK)),
    "delete_ours": run("delete", Snap(ce.MARK, status="available")),
}

# create marks its record; a retry never adopts a record create did not make
vol = types.SimpleNamespace(id=VID, host="h@b#p", status="available", migration_status=None,
                            project_id="p", user_id="u", size=1, volume_type_id=None,
                            encryption_key_id=None)
current["volume"] = vol
body = {"create-snapshot-metadata": {"volume_id": VID}}
for name, existing in (("create_new", None), ("create_retry_cinder", Snap(None)),
                       ("create_retry_ours", Snap(ce.MARK))):
    ce.QsnapSnapshotMetadataController._existing = staticmethod(lambda ctx, sid, e=existing: e)
    current["snap"] = existing or Snap(ce.MARK)
    del calls[:]
    try:
        create(ctrl, req, SID, body)
        code = 202
    except webob.exc.HTTPException as exc:
        code = exc.code
    out[name] = {"code": code, "calls": [c for c in calls if isinstance(c, list | tuple)]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    if not PYTHON.exists():
        pytest.skip(f"no Cinder venv at {PYTHON.parent.parent}: run tools/cinder_setup.sh")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [str(PYTHON), "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "case",
    [
        "finalize_cinder",
        "finalize_forged_metadata",
        "finalize_driver_id",
        "delete_cinder",
        "delete_cinder_error",
    ],
)
def test_snapshot_cinder_made_is_refused_and_unchanged(probe: dict[str, Any], case: str) -> None:
    r = probe[case]
    assert r["code"] == 409, r
    assert "not recorded through os-qsnap-snapshot-metadata" in r["message"]
    assert r["after"] == r["before"]
    assert r["updates"] == [] and r["calls"] == []  # no claim, no quota, no glance, no destroy


def test_control_records_made_by_create_are_finalized_and_deleted(probe: dict[str, Any]) -> None:
    fin = probe["finalize_ours"]
    assert fin["code"] == 200 and fin["after"]["status"] == "available"
    assert fin["updates"] == [["provider_id", "status"]]  # the mark is part of the claim
    dele = probe["delete_ours"]
    assert dele["code"] == 202 and dele["after"]["destroyed"] is True
    assert dele["updates"] == [["provider_id", "status"]]
    assert dele["calls"] == ["reserve", "glance", "commit"]


def test_create_marks_and_never_adopts_a_cinder_record(probe: dict[str, Any]) -> None:
    assert probe["create_new"] == {"code": 202, "calls": [["create", probe["mark"]]]}
    assert probe["create_retry_cinder"]["code"] == 409
    assert probe["create_retry_ours"] == {"code": 202, "calls": []}  # idempotent retry
