"""python-novaclient against qsnap-api (its own process) -> RabbitMQ -> stub agent process.

Cinder's NFS driver talks to "Nova" through python-novaclient; here novaclient runs
unchanged with a keystoneauth1 session (token plugin + endpoint, as Cinder's
``[nova] auth_type = none`` does) against qsnap-api, which routes over a real RabbitMQ to the
stub agent (testbed/stub_agent.py), found through ``[api] hosts`` or the
inventory fanout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keystoneauth1 import session, token_endpoint
from novaclient import client as nova_client
from novaclient import exceptions as nova_exc

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import InventoryFanout, get_transport
from testbed.service import Service, start_api
from testbed.stub_agent import INSTANCE, VOL_BUSY, VOL_OK, start_stub_agent

pytestmark = pytest.mark.functional
HOST = "stub-host-api"
SNAP = "55555555-5555-4555-8555-555555555555"
NEW_FILE = f"volume-{VOL_OK}.{SNAP}"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def agent(rabbitmq: Any, logdir: Path) -> Iterator[Service]:
    (logdir / "volumes").write_text(VOL_OK)
    extra = ["--volumes-file", str(logdir / "volumes")]
    svc = start_stub_agent(logdir, rabbitmq.transport_url, HOST, timeout=60, extra=extra)
    yield svc
    assert svc.stop(30) == 0, svc.tail()


@pytest.fixture(scope="module")
def api_url(rabbitmq: Any, agent: Any, logdir: Path) -> Iterator[str]:
    api_opts = {"noauth_roles": "service", "hosts": HOST, "rpc_timeout": 20}
    svc, url = start_api(
        logdir, rabbitmq.transport_url, {**api_opts, "max_request_body_size": 4096}, timeout=60
    )
    yield url
    assert svc.stop(30) == 0, svc.tail()


def _nova(api_url: str) -> Any:
    """novaclient the way Cinder builds it without Keystone: a token and an endpoint."""
    sess = session.Session(auth=token_endpoint.Token(api_url + "/v2.1", "notused"))
    return nova_client.Client("2.1", session=sess, endpoint_override=api_url + "/v2.1")


def _create_info(**extra: object) -> dict[str, object]:
    return {"snapshot_id": SNAP, "type": "qcow2", "new_file": NEW_FILE, **extra}


def _delete_info(**extra: object) -> dict[str, object]:
    info = {"volume_id": VOL_OK, "type": "qcow2", "file_to_merge": NEW_FILE}
    return {**info, "merge_target_file": f"volume-{VOL_OK}", **extra}


def test_novaclient_create_and_delete(api_url: str) -> None:
    nova = _nova(api_url)
    snap = nova.assisted_volume_snapshots.create(VOL_OK, _create_info())
    assert (snap.id, snap.volumeId) == (SNAP, VOL_OK)
    # Cinder's pull form (merge_target_file None) and commit form both answer 204
    nova.assisted_volume_snapshots.delete(snap, _delete_info())
    nova.assisted_volume_snapshots.delete(
        SNAP, _delete_info(file_to_merge=None, merge_target_file=None)
    )


def test_microversion_headers_on_the_wire(api_url: str) -> None:
    sess = session.Session()
    resp = sess.post(
        api_url + "/v2.1/os-assisted-volume-snapshots",
        json={"snapshot": {"volume_id": VOL_OK, "create_info": _create_info()}},
        headers={"X-Auth-Token": "cinder:svc", "X-OpenStack-Nova-API-Version": "2.1"},
    )
    assert resp.headers["OpenStack-API-Version"] == "compute 2.1"
    assert resp.headers["X-OpenStack-Nova-API-Version"] == "2.1"
    assert resp.json() == {"snapshot": {"id": SNAP, "volumeId": VOL_OK}}


@pytest.mark.parametrize(
    ("volume", "info", "error"),
    [
        (VOL_OK, _create_info(extra="x"), nova_exc.BadRequest),
        (VOL_OK, _create_info(new_file="../" + NEW_FILE), nova_exc.BadRequest),
        (VOL_OK, _create_info(type="raw"), nova_exc.BadRequest),
        ("not-a-uuid", _create_info(), nova_exc.BadRequest),
        (str(uuid.uuid4()), _create_info(), nova_exc.NotFound),
    ],
    ids=["extra-field", "dotdot", "type-raw", "bad-uuid", "unknown-volume"],
)
def test_novaclient_errors(
    api_url: str, volume: str, info: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _nova(api_url).assisted_volume_snapshots.create(volume, info)


def test_oversized_body_refused(api_url: str) -> None:
    with pytest.raises(nova_exc.ClientException) as exc:
        _nova(api_url).assisted_volume_snapshots.create(VOL_OK, _create_info(id="x" * 8000))
    assert exc.value.code == 413


def test_no_token_is_401(api_url: str) -> None:
    resp = session.Session().delete(
        api_url + f"/v2.1/os-assisted-volume-snapshots/{SNAP}", raise_exc=False
    )
    assert resp.status_code == 401


def test_fanout_inventory_routes_new_volume_and_busy_is_409(
    api_url: str, rabbitmq: Any, logdir: Path
) -> None:
    """VOL_BUSY is in no inventory (404) until it is attached to the agent, which then
    publishes it; the request reaches the agent, whose DiskBusy comes back as 409. (The
    router believes a claim the host itself answers for: the stub's own inventory changes
    before its fanout, as a real agent's does.)"""
    nova = _nova(api_url)
    with pytest.raises(nova_exc.NotFound):
        nova.assisted_volume_snapshots.create(VOL_BUSY, _create_info())
    (logdir / "volumes").write_text(f"{VOL_OK},{VOL_BUSY}")  # attached on the host
    transport = get_transport(make_conf(), rabbitmq.transport_url)
    try:
        vols = tuple(
            api.VolumeAttachment(v, INSTANCE, "instance-0001", t, f"/s/volume-{v}")
            for v, t in ((VOL_OK, "vdb"), (VOL_BUSY, "vdc"))
        )
        InventoryFanout(transport)(api.Inventory(HOST, vols, generation=2))
        deadline = time.monotonic() + 30
        while True:
            try:
                nova.assisted_volume_snapshots.create(VOL_BUSY, _create_info())
            except nova_exc.NotFound:
                assert time.monotonic() < deadline, "fanout inventory never reached the API"
                time.sleep(0.2)
                continue
            except nova_exc.Conflict:
                break
            pytest.fail("a busy disk was not refused")
    finally:
        transport.cleanup()
