"""Routing does not trust the bus: qsnap-api and stub agents on a private RabbitMQ vhost with
the README's users and permissions, the test publishing spoofed inventories with an agent's
credentials (what any holder of them can do).

- a rogue ``aaa-rogue`` (sorts first; no process) claiming the volume with generation 1, a
  restarted host's stale generation-1 claim, and spoofed empty inventories of the real holder
  (generation 1 and 10**12) neither redirect nor black-hole the volume: every request still
  reaches ``host-real``;
- a stopped agent is skipped within ``[api] host_timeout`` by GET /v1/operations/{id}
  (before: 503 after ``rpc_timeout``), and once expired (``[api] host_ttl``) it is no longer
  asked at all;
- the API's credentials cannot publish an inventory.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import InventoryFanout, get_transport
from testbed.service import REPO, Service, start_api
from testbed.stub_agent import INSTANCE, VOL_OK, start_stub_agent

pytestmark = pytest.mark.functional
REAL, STALE, DEAD, ROGUE = "host-real", "host-prev", "aaa-dead", "aaa-rogue"
TTL, HOST_TIMEOUT, EVERY = 8.0, 1.0, 1.0
ADMIN = {"X-Auth-Token": "admin:adminproject", "X-Roles": "admin"}

# The README's "The bus is a trust boundary" setup, verbatim (checked below).
PERMISSIONS = {
    "agent": (
        r"^(openstack|qsnap-agent([._].+)?|qsnap-inventory_fanout|notifications\..+)$",
        r"^(openstack|amq\.default|qsnap-agent([._].+)?|qsnap-inventory_fanout|notifications\..+)$",
        r"^(openstack|qsnap-agent([._].+)?)$",
    ),
    "api": (
        r"^(openstack|qsnap-inventory([._].+)?|reply_.+)$",
        r"^(openstack|qsnap-inventory(\..+|_fanout_.+)?|reply_.+)$",
        r"^(openstack|qsnap-inventory([._].+)?|reply_.+)$",
    ),
}
TOPIC_PERMISSIONS = {
    "agent": (r"^notifications\..+$", r"^(qsnap-agent(\..+)?|notifications\..+)$"),
    "api": (r"^qsnap-agent(\..+)?$", r"^qsnap-inventory(\..+)?$"),
}


@dataclass
class Bus:
    vhost: str
    urls: dict[str, str]  # role -> transport_url
    amqp: dict[str, str]  # role -> kombu url


def _ctl(node: Any, *args: str) -> str:
    """rabbitmqctl of the private node (the packaged wrapper would switch to the rabbitmq
    user, whose Erlang cookie is not the node's)."""
    env = dict(os.environ, HOME=str(node.base), ERL_EPMD_PORT=str(node.epmd_port))
    out = subprocess.run(
        ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-q", "-n", f"{node.name}@localhost", *args],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.fixture(scope="module")
def bus(rabbitmq: Any) -> Iterator[Bus]:
    tag = uuid.uuid4().hex[:6]
    vhost = f"qsnap-{tag}"
    _ctl(rabbitmq, "add_vhost", vhost)
    urls, amqp = {}, {}
    for role in ("agent", "api"):
        user, secret = f"qsnap-{role}-{tag}", uuid.uuid4().hex
        _ctl(rabbitmq, "add_user", user, secret)
        _ctl(rabbitmq, "set_permissions", "-p", vhost, user, *PERMISSIONS[role])
        _ctl(rabbitmq, "set_topic_permissions", "-p", vhost, user, "openstack",
             *TOPIC_PERMISSIONS[role])  # fmt: skip
        urls[role] = f"rabbit://{user}:{secret}@127.0.0.1:{rabbitmq.port}/{vhost}"
        amqp[role] = f"amqp://{user}:{secret}@127.0.0.1:{rabbitmq.port}/{vhost}"
    yield Bus(vhost, urls, amqp)
    _ctl(rabbitmq, "delete_vhost", vhost)
    for role in ("agent", "api"):
        _ctl(rabbitmq, "delete_user", f"qsnap-{role}-{tag}")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inventory-trust")


@pytest.fixture(scope="module")
def agents(bus: Bus, logdir: Path) -> Iterator[dict[str, Service]]:
    """host-real has VOL_OK; host-prev and aaa-dead have nothing; all publish every 1 s."""
    started: dict[str, Service] = {}
    try:
        for host, vols in ((REAL, VOL_OK), (STALE, ""), (DEAD, "")):
            started[host] = start_stub_agent(
                logdir, bus.urls["agent"], host, name=f"stub-{host}", timeout=90,
                extra=["--volumes", vols, "--publish-every", str(EVERY)],
            )  # fmt: skip
        yield started
    finally:
        for svc in started.values():
            svc.stop(30)


@pytest.fixture(scope="module")
def api_url(bus: Bus, agents: dict[str, Service], logdir: Path) -> Iterator[str]:
    opts = {
        "noauth_roles": "admin",
        "rpc_timeout": 20,
        "host_ttl": TTL,
        "host_timeout": HOST_TIMEOUT,
    }
    svc, url = start_api(logdir, bus.urls["api"], opts, timeout=90)
    try:
        deadline = time.monotonic() + 60
        while _backup_host(url, check=False) != REAL:  # the first publications heard
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.2)
        yield url
    finally:
        assert svc.stop(30) == 0, svc.tail()


@pytest.fixture(scope="module")
def spoof(bus: Bus) -> Iterator[InventoryFanout]:
    """Publishes on the fanout with an agent's credentials."""
    transport = get_transport(make_conf(overrides={"transport_url": bus.urls["agent"]}))
    yield InventoryFanout(transport)
    transport.cleanup()


def _backup_host(url: str, *, check: bool = True) -> str | None:
    """Where a request for VOL_OK goes: the host of the backup operation it started."""
    body = {"backup": {"volume_ids": [VOL_OK], "incremental": False}}
    resp = requests.post(f"{url}/v1/backups", json=body, headers=ADMIN, timeout=60)
    if not check and resp.status_code != 202:
        return None
    assert resp.status_code == 202, resp.text
    return str(resp.json()["operation"]["host"])


def _instance_host(url: str) -> str:
    body = {"snapshot": {"quiesce": "none"}}
    resp = requests.post(
        f"{url}/v1/instances/{INSTANCE}/snapshots", json=body, headers=ADMIN, timeout=60
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["operation"]["host"])


def _inventory(host: str, generation: int, *volumes: str) -> api.Inventory:
    vols = tuple(api.VolumeAttachment(v, INSTANCE, "i-1", "vdb", f"/x/volume-{v}") for v in volumes)
    return api.Inventory(host, vols, generation)


def _always_routed_to_real(url: str, seconds: float) -> int:
    """Requests for VOL_OK (and its instance) for ``seconds``: all reach host-real."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        assert (_backup_host(url), _instance_host(url)) == (REAL, REAL)
        n += 1
        time.sleep(0.2)
    return n


def test_readme_documents_exactly_these_permissions() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The bus is a trust boundary") :]
    for regexes in (*PERMISSIONS.values(), *TOPIC_PERMISSIONS.values()):
        for regex in regexes:
            assert f"'{regex}'" in section, regex


def test_api_credentials_cannot_publish_inventory(bus: Bus, api_url: str) -> None:
    import amqp.exceptions
    import kombu

    with kombu.Connection(bus.amqp["api"], connect_timeout=10) as conn:
        channel = conn.channel()
        channel.basic_publish(
            amqp.Message(b"{}"), exchange="qsnap-inventory_fanout", routing_key=""
        )
        with pytest.raises(amqp.exceptions.AccessRefused):
            channel.exchange_declare("qsnap-inventory_fanout", "fanout", passive=True)


def test_rogue_generation_1_claim_does_not_redirect(api_url: str, spoof: InventoryFanout) -> None:
    """Before: aaa-rogue sorted first and took VOL_OK (requests timed out: 503)."""
    spoof(_inventory(ROGUE, 1, VOL_OK))
    # the router asks aaa-rogue (nobody answers: 5 s probe timeout) and keeps host-real
    assert _always_routed_to_real(api_url, 7.0) > 0


def test_restarted_hosts_stale_claim_does_not_redirect(
    api_url: str, spoof: InventoryFanout
) -> None:
    """host-prev (alive, answers with no volume; sorts before host-real) replays its
    pre-restart claim."""
    spoof(_inventory(STALE, 1, VOL_OK))
    spoof(_inventory(STALE, 0, VOL_OK))
    assert _always_routed_to_real(api_url, 3.0) > 0


@pytest.mark.parametrize("generation", [1, 10**12])
def test_spoofed_empty_inventory_does_not_black_hole(
    api_url: str, spoof: InventoryFanout, generation: int
) -> None:
    """Before: VOL_OK became unroutable (404), and after 10**12 host-real's own updates were
    dropped as stale."""
    spoof(_inventory(REAL, generation))
    assert _always_routed_to_real(api_url, 3.0) > 0


def test_dead_host_is_skipped_in_time_then_expires(
    api_url: str, agents: dict[str, Service]
) -> None:
    op_id = requests.post(
        f"{api_url}/v1/backups",
        json={"backup": {"volume_ids": [VOL_OK], "incremental": False}},
        headers=ADMIN,
        timeout=60,
    ).json()["operation"]["id"]
    assert agents[DEAD].stop(30) == 0
    stopped = time.monotonic()

    start = time.monotonic()
    resp = requests.get(f"{api_url}/v1/operations/{op_id}", headers=ADMIN, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["operation"]["host"] == REAL
    found_in = time.monotonic() - start

    unknown = uuid.uuid4().hex
    start = time.monotonic()
    resp = requests.get(f"{api_url}/v1/operations/{unknown}", headers=ADMIN, timeout=60)
    skipped_in = time.monotonic() - start
    assert time.monotonic() - stopped < TTL, "too slow to see the dead host still known"
    assert resp.status_code == 404, resp.text  # before: 503 after rpc_timeout (20 s)
    assert f"no answer from {DEAD}" in resp.json()["itemNotFound"]["message"]
    assert skipped_in < HOST_TIMEOUT + 2.0, skipped_in

    resp = requests.post(f"{api_url}/v1/operations/{unknown}/cancel", headers=ADMIN, timeout=60)
    assert resp.status_code == 404, resp.text

    time.sleep(max(0.0, TTL + 1.5 - (time.monotonic() - stopped)))  # aaa-dead expires
    start = time.monotonic()
    resp = requests.get(f"{api_url}/v1/operations/{unknown}", headers=ADMIN, timeout=60)
    expired_in = time.monotonic() - start
    assert resp.status_code == 404, resp.text
    assert DEAD not in resp.json()["itemNotFound"]["message"]
    listing = requests.get(f"{api_url}/v1/operations", headers=ADMIN, timeout=60).json()
    assert DEAD not in listing.get("failed_hosts", {})
    assert {op["host"] for op in listing["operations"]} == {REAL}
    print(f"found {found_in:.2f}s, dead host skipped {skipped_in:.2f}s, expired {expired_in:.2f}s")
