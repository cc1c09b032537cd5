"""qsnap's Cinder API extension loaded into a real Cinder 29 (PyPI) with its real NfsDriver.

Driven through the cinderclient extension (api_ext.cinderclient_ext) as the agent will drive
it; raw HTTP only for bodies the client would never send. The share is a plain directory.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cinderclient import exceptions as cexc
from cinderclient.extension import Extension

import qcow2
from api_ext import cinderclient_ext
from testbed.cinder import CONNECTOR, REPO, VENV, CinderPeer, attach
from testbed.shares import DirShare

EXT = "api_ext.cinder_extension.Qsnap_snapshot_metadata"


@pytest.fixture(scope="module")
def cinder(dir_share: DirShare) -> Iterator[CinderPeer]:
    if not (VENV / "bin" / "cinder-manage").exists():
        pytest.skip(f"no Cinder venv at {VENV}: run tools/cinder_setup.sh")
    with CinderPeer(
        dir_share.new_dir("cinder"), extra_extensions=(EXT,), pythonpath=(REPO,), policy={}
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def client(cinder: CinderPeer) -> Any:
    """A cinderclient with ``client.qsnap_snapshots`` bound to our manager."""
    from cinderclient import api_versions
    from cinderclient import client as cclient
    from cinderclient.contrib.noauth import CinderNoAuthPlugin
    from keystoneauth1 import session

    auth = CinderNoAuthPlugin(cinder.user_id, cinder.project_id, endpoint=cinder.endpoint)
    return cclient.Client(
        api_versions.APIVersion("3.44"),
        session=session.Session(auth=auth),
        extensions=[Extension("qsnap_snapshots", cinderclient_ext)],
    )


def _wait(get: Callable[[], Any], done: Callable[[Any], bool], what: str, t: float = 60) -> Any:
    deadline = time.monotonic() + t
    while True:
        obj = get()
        if done(obj):
            return obj
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {getattr(obj, 'status', obj)!r} after {t}s")
        time.sleep(0.2)


def _volume(client: Any) -> Any:
    v = client.volumes.create(1)
    return _wait(lambda: client.volumes.get(v.id), lambda o: o.status != "creating", "volume")


def _post(cinder: CinderPeer, path: str, body: object) -> tuple[int, Any]:
    """Raw POST (noauth token): for malformed bodies cinderclient would never build."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - our own http:// endpoint
        f"{cinder.endpoint}/{cinder.project_id}/{path}",
        data=data,
        method="POST",
        headers={
            "X-Auth-Token": f"{cinder.user_id}:{cinder.project_id}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _agent_snapshot(share: Path, volume_id: str, snapshot_id: str) -> str:
    """What the agent does for a detached volume: overlay + ledger, then guest data in it."""
    base = f"volume-{volume_id}"
    new = f"{base}.{snapshot_id}"
    qcow2.create_overlay(str(share / new), str(share / base), backing_fmt="raw", roots=[str(share)])
    qcow2.write_ledger(
        str(share), volume_id, qcow2.Ledger(active=new, snapshots={snapshot_id: new})
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(share / new)],
        check=True,
        capture_output=True,
    )
    return new


def _tree(d: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file's inode, size, mtime, and content hash (skipping the sparse 1 GiB bases)."""
    out = {}
    for p in sorted(d.iterdir()):
        st = p.stat()
        small = st.st_size < 64 << 20
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if small else ""
        out[p.name] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)
    return out


def test_alias_listed(cinder: CinderPeer) -> None:
    aliases = {e["alias"] for e in cinder.get("extensions")["extensions"]}
    assert "os-qsnap-snapshot-metadata" in aliases
    assert "os-snapshot-actions" in aliases  # the standard ones still load beside ours


def test_create_finalize_then_cinder_deletes_normally(cinder: CinderPeer, client: Any) -> None:
    vol = _volume(client)
    assert vol.status == "available"
    sid = str(uuid.uuid4())
    new = _agent_snapshot(cinder.share_dir, vol.id, sid)

    snap = client.qsnap_snapshots.create_metadata(
        sid, vol.id, name="agent", description="instance snapshot", metadata={"qsnap": "1"}
    )
    assert (snap.id, snap.status, snap.volume_id) == (sid, "creating", vol.id)
    seen = client.volume_snapshots.get(sid)
    assert (seen.status, seen.volume_id, seen.name, seen.metadata) == (
        "creating",
        vol.id,
        "agent",
        {"qsnap": "1"},
    )
    assert getattr(seen, "os-extended-snapshot-attributes:progress") == "0%"
    # a retry of the same create (agent restarted mid-step) is answered, not duplicated
    again = client.qsnap_snapshots.create_metadata(sid, vol.id)
    assert again.id == sid
    assert [s.id for s in client.volume_snapshots.list() if s.volume_id == vol.id] == [sid]

    done = client.qsnap_snapshots.finalize(sid, "available")
    assert done.status == "available"
    seen = client.volume_snapshots.get(sid)
    assert seen.status == "available"
    assert getattr(seen, "os-extended-snapshot-attributes:progress") == "100%"
    with pytest.raises(cexc.ClientException) as err:  # only 'creating' may be finalized
        client.qsnap_snapshots.finalize(sid, "error")
    assert err.value.code == 409

    # Cinder's own NfsDriver now deletes it offline: commit into the base, drop the overlay.
    client.volume_snapshots.delete(sid)

    def gone() -> bool:
        try:
            client.volume_snapshots.get(sid)
        except cexc.NotFound:
            return True
        return False

    _wait(lambda: gone(), bool, "snapshot delete", 120)
    share = cinder.share_dir
    assert not (share / new).exists()
    ledger = qcow2.read_ledger(str(share), vol.id)
    assert ledger is not None and ledger.active == f"volume-{vol.id}" and not ledger.snapshots
    out = subprocess.run(  # the overlay's data landed in the base (raw) volume
        ["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", str(share / f"volume-{vol.id}")],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in out.stdout
    assert client.volumes.get(vol.id).status == "available"


def test_attached_volume_points_at_the_active_file(cinder: CinderPeer, client: Any) -> None:
    """Issue 13: finalize and delete-metadata keep the attachment's connection_info and the
    volume's format on the active file, as remotefs does for its own snapshots (what Nova
    copies into its BDM and os-initialize_connection hands out)."""
    vol = _volume(client)
    assert attach(client, vol.id, str(uuid.uuid4())).status == "in-use"
    att_id = client.volumes.get(vol.id).attachments[0]["attachment_id"]

    def pointer() -> tuple[str, str]:
        info = client.attachments.show(att_id).connection_info
        return info["name"], info.get("format", "raw")

    base = f"volume-{vol.id}"
    assert pointer() == (base, "raw")
    sid = str(uuid.uuid4())
    new = _agent_snapshot(cinder.share_dir, vol.id, sid)
    client.qsnap_snapshots.create_metadata(sid, vol.id)
    assert pointer() == (base, "raw")  # creating: nothing moves yet
    client.qsnap_snapshots.finalize(sid, "available")
    assert pointer() == (new, "qcow2")
    init = client.volumes.initialize_connection(vol.id, dict(CONNECTOR, host="other"))
    assert (init["data"]["name"], init["data"]["format"]) == (new, "qcow2")

    # a pointer at another volume's file is refused and nothing changes
    code, _ = _post(
        cinder,
        f"snapshots/{sid}/action",
        {"snapshot-delete-metadata": {"active": f"volume-{uuid.uuid4()}", "format": "raw"}},
    )
    assert code == 400 and client.volume_snapshots.get(sid).status == "available"
    code, _ = _post(
        cinder, f"snapshots/{sid}/action", {"snapshot-delete-metadata": {"active": base}}
    )
    assert code == 400 and pointer() == (new, "qcow2")  # a name without its format

    qcow2.write_ledger(str(cinder.share_dir), vol.id, qcow2.Ledger(active=base, snapshots={}))
    client.qsnap_snapshots.delete_metadata(sid, cinderclient_ext.ActiveFile(base, "raw"))
    assert pointer() == (base, "raw")
    init = client.volumes.initialize_connection(vol.id, dict(CONNECTOR, host="other"))
    assert (init["data"]["name"], init["data"]["format"]) == (base, "raw")


def test_finalize_error(client: Any) -> None:
    vol = _volume(client)
    sid = str(uuid.uuid4())
    client.qsnap_snapshots.create_metadata(sid, vol.id)
    client.qsnap_snapshots.finalize(sid, "creating", progress="50%")
    seen = client.volume_snapshots.get(sid)
    assert (seen.status, getattr(seen, "os-extended-snapshot-attributes:progress")) == (
        "creating",
        "50%",
    )
    assert client.qsnap_snapshots.finalize(sid, "error").status == "error"
    client.qsnap_snapshots.delete_metadata(sid)


def test_delete_metadata_touches_no_file(cinder: CinderPeer, client: Any) -> None:
    vol = _volume(client)
    sid = str(uuid.uuid4())
    _agent_snapshot(cinder.share_dir, vol.id, sid)
    client.qsnap_snapshots.create_metadata(sid, vol.id)
    client.qsnap_snapshots.finalize(sid)
    before = _tree(cinder.share_dir)

    client.qsnap_snapshots.delete_metadata(sid)

    with pytest.raises(cexc.NotFound):
        client.volume_snapshots.get(sid)
    assert _tree(cinder.share_dir) == before
    with pytest.raises(cexc.NotFound):
        client.qsnap_snapshots.delete_metadata(sid)
    with pytest.raises(cexc.ClientException) as err:  # a used id never comes back
        client.qsnap_snapshots.create_metadata(sid, vol.id)
    assert err.value.code == 409


def test_bad_input_is_4xx_and_records_nothing(cinder: CinderPeer, client: Any) -> None:
    vol = _volume(client)
    other = str(uuid.uuid4())
    count = len(client.volume_snapshots.list())

    with pytest.raises(cexc.NotFound):  # unknown volume
        client.qsnap_snapshots.create_metadata(other, str(uuid.uuid4()))
    for bad_id in ("not-a-uuid", other.upper(), "{" + other + "}", other.replace("-", "")):
        code, _ = _post(
            cinder,
            f"snapshots/{bad_id}/action",
            {"create-snapshot-metadata": {"volume_id": vol.id}},
        )
        assert code == 400, bad_id
    bodies: list[object] = [
        {"create-snapshot-metadata": {"volume_id": "../etc"}},
        {"create-snapshot-metadata": {"volume_id": vol.id, "size": 5}},
        {"create-snapshot-metadata": {}},
        {"create-snapshot-metadata": {"volume_id": vol.id, "metadata": {"k": 1}}},
        {"create-snapshot-metadata": {"volume_id": vol.id, "name": "x" * 256}},
        {"create-snapshot-metadata": {"volume_id": vol.id}, "extra": 1},
        {"finalize-snapshot-metadata": {"status": "deleted"}},
        {"finalize-snapshot-metadata": {"status": "available", "progress": "101%"}},
        {"snapshot-delete-metadata": {"force": True}},
        b"{not json",
    ]
    for body in bodies:
        code, _ = _post(cinder, f"snapshots/{other}/action", body)
        assert code == 400, body
    with pytest.raises(cexc.NotFound):
        client.qsnap_snapshots.finalize(other)
    assert len(client.volume_snapshots.list()) == count


def test_policy_denies_callers_without_the_rule(cinder: CinderPeer, client: Any) -> None:
    """noauth callers are admins: narrowing the rule to the service role must lock them out."""
    vol = _volume(client)
    sid = str(uuid.uuid4())
    client.qsnap_snapshots.create_metadata(sid, vol.id)
    cinder.set_policy({"qsnap:snapshot_metadata": "role:service"})
    try:
        with pytest.raises(cexc.Forbidden):
            client.qsnap_snapshots.create_metadata(str(uuid.uuid4()), vol.id)
        with pytest.raises(cexc.Forbidden):
            client.qsnap_snapshots.finalize(sid)
        with pytest.raises(cexc.Forbidden):
            client.qsnap_snapshots.delete_metadata(sid)
    finally:
        cinder.set_policy({})
    assert client.volume_snapshots.get(sid).status == "creating"
    assert client.qsnap_snapshots.finalize(sid).status == "available"


def _seen(client: Any, sid: str) -> tuple[Any, ...]:
    s = client.volume_snapshots.get(sid)
    progress = getattr(s, "os-extended-snapshot-attributes:progress")
    return (s.status, progress, s.name, s.description, s.metadata, s.updated_at, s.size)


def test_snapshot_cinder_made_itself_is_refused_and_unchanged(
    cinder: CinderPeer, client: Any
) -> None:
    """Issue 14: finalize and delete-metadata act only on records create-snapshot-metadata
    made. A snapshot Cinder's NfsDriver took (its overlay and ledger entry on the share) is
    refused with 409 and stays exactly as it was: record, quota usage, files."""
    vol = _volume(client)
    snap = client.volume_snapshots.create(vol.id, name="cinder-own", metadata={"k": "v"})
    _wait(lambda: client.volume_snapshots.get(snap.id), lambda o: o.status != "creating", "snap")
    # a project member could write any metadata key: forging one must not make it ours
    client.volume_snapshots.set_metadata(snap.id, {"qsnap": "recorded"})
    before = _seen(client, snap.id)
    assert before[0] == "available"
    files = _tree(cinder.share_dir)
    ledger = qcow2.read_ledger(str(cinder.share_dir), vol.id)
    assert ledger is not None and snap.id in ledger.snapshots
    usage = client.quotas.get(cinder.project_id, usage=True).snapshots

    for call in (
        lambda: client.qsnap_snapshots.finalize(snap.id, "error"),
        lambda: client.qsnap_snapshots.finalize(snap.id, "available"),
        lambda: client.qsnap_snapshots.delete_metadata(snap.id),
    ):
        with pytest.raises(cexc.ClientException) as err:
            call()
        assert err.value.code == 409
        assert "not recorded through os-qsnap-snapshot-metadata" in str(err.value)
    # raw POSTs too (what a caller holding the service role could send)
    for body in (
        {"finalize-snapshot-metadata": {"status": "creating", "progress": "5%"}},
        {"snapshot-delete-metadata": None},
    ):
        code, _ = _post(cinder, f"snapshots/{snap.id}/action", body)
        assert code == 409, body

    assert _seen(client, snap.id) == before
    assert _tree(cinder.share_dir) == files
    assert qcow2.read_ledger(str(cinder.share_dir), vol.id) == ledger
    assert client.quotas.get(cinder.project_id, usage=True).snapshots == usage
    # control: a record made through the extension on the same volume is still finalized
    sid = str(uuid.uuid4())
    client.qsnap_snapshots.create_metadata(sid, vol.id)
    assert client.qsnap_snapshots.finalize(sid).status == "available"
    client.qsnap_snapshots.delete_metadata(sid)
    # and Cinder still owns and deletes its own snapshot normally
    client.volume_snapshots.delete(snap.id)

    def gone() -> bool:
        try:
            client.volume_snapshots.get(snap.id)
        except cexc.NotFound:
            return True
        return False

    _wait(lambda: gone(), bool, "cinder's own delete", 120)


def _gone(get: Callable[[], Any]) -> bool:
    try:
        get()
    except cexc.NotFound:
        return True
    return False


def test_plain_delete_cascades_over_backup_checkpoints_only(
    cinder: CinderPeer, client: Any
) -> None:
    """A volume whose only snapshot is a backup checkpoint is deleted by a plain DELETE (the
    extension asks Cinder for cascade; its NfsDriver merges the checkpoint offline and
    removes every file). Negative control: with one more snapshot that is not a
    checkpoint, the same plain DELETE is refused by Cinder and nothing changes."""
    share = cinder.share_dir
    mixed, only = _volume(client), _volume(client)
    cp_mixed, user = str(uuid.uuid4()), str(uuid.uuid4())
    for vol, sid, checkpoint in ((mixed, cp_mixed, True), (mixed, user, False)):
        client.qsnap_snapshots.create_metadata(sid, vol.id, checkpoint=checkpoint)
        client.qsnap_snapshots.finalize(sid, "available")
    before = _tree(share)
    with pytest.raises(cexc.BadRequest, match="snapshots"):
        client.volumes.delete(mixed.id)
    assert client.volumes.get(mixed.id).status == "available"
    assert {s.id for s in client.volume_snapshots.list() if s.volume_id == mixed.id} == {
        cp_mixed,
        user,
    }
    assert _tree(share) == before

    cp = str(uuid.uuid4())
    new = _agent_snapshot(share, only.id, cp)
    client.qsnap_snapshots.create_metadata(cp, only.id, checkpoint=True)
    client.qsnap_snapshots.finalize(cp, "available")
    client.volumes.delete(only.id)  # plain: no cascade asked
    _wait(lambda: _gone(lambda: client.volumes.get(only.id)), bool, "volume delete", 120)
    assert _gone(lambda: client.volume_snapshots.get(cp))
    assert not [p.name for p in share.iterdir() if p.name.startswith(f"volume-{only.id}")], new
