"""The router does not trust the bus: hosts expire, changed claims are believed only once the
claimed host answers for them, state is bounded, and a host that does not answer is skipped
in the operation look-up instead of failing it.

Each test names the old behaviour it guards against (first host by name won a volume,
generation <= 1 always accepted, hosts never expired, the first silent host in name order
made GET /v1/operations/{id} answer 503): under it the test fails.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import webtest

from api_ext import auth
from api_ext.app import ApiApp
from api_ext.config import make_conf
from api_ext.router import (
    MAX_PENDING,
    REPROBE_INTERVAL,
    NotRouted,
    Router,
    RouterSettings,
    Unverified,
)
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport, om
from tests.unit.api_ext.fakes import ADMIN, INST, VOL, FakeAgent, op

VOL_B = "77777777-7777-4777-8777-777777777777"
INST_B = "88888888-8888-4888-8888-888888888888"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hosts:
    """What each host's agent answers to ``get_inventory``; a host not in ``answers`` is down."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[str, ...]] = {}
        self.asked: list[str] = []

    def __call__(self, host: str) -> api.Inventory:
        self.asked.append(host)
        if host not in self.answers:
            raise om.MessagingTimeout(f"no reply from {host}")
        vols = tuple(
            api.VolumeAttachment(v, INST if v == VOL else INST_B, "d", "vdb", "/s/f")
            for v in self.answers[host]
        )
        return api.Inventory(host, vols, 0)  # the real agent's answer has generation 0


def _vol(volume: str = VOL, instance: str = INST) -> list[dict[str, str]]:
    return [{"volume_id": volume, "instance_uuid": instance}]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hosts() -> Hosts:
    return Hosts()


@pytest.fixture
def router(clock: Clock, hosts: Hosts) -> Router:
    settings = RouterSettings(host_ttl=180.0, host_timeout=0.5, max_hosts=100)
    return Router(probe=hosts, settings=settings, clock=clock, background=False)


def _held_by(router: Router, host: str) -> Router:
    assert router.update(host, _vol(), 5)
    assert router.host_for_volume(VOL) == host
    return router


# -- expiry ---------------------------------------------------------------------------------
def test_host_expires_after_ttl_and_routes_nothing(router: Router, clock: Clock) -> None:
    """Old: hosts never expired (routed and asked forever)."""
    _held_by(router, "host-a")
    clock.now += 180.0
    assert router.known_hosts() == ["host-a"]
    assert router.host_for_volume(VOL) == "host-a"
    clock.now += 0.5
    assert router.known_hosts() == []
    with pytest.raises(NotRouted):
        router.host_for_volume(VOL)
    with pytest.raises(NotRouted):
        router.host_for_instance(INST)


def test_publishing_or_answering_a_probe_keeps_a_host_alive(
    router: Router, clock: Clock, hosts: Hosts
) -> None:
    _held_by(router, "host-a")
    clock.now += 150.0
    router.update("host-a", _vol(), 5)  # the periodic republication
    clock.now += 150.0
    assert router.known_hosts() == ["host-a"]
    hosts.answers["host-a"] = (VOL,)
    router.update("host-a", [], 6)  # a removal: the host is asked, and its answer counts
    assert router.verify_pending() == ["host-a"]
    clock.now += 150.0
    assert router.host_for_volume(VOL) == "host-a"


def test_expired_hosts_are_forgotten_and_static_hosts_stay_known(clock: Clock) -> None:
    router = Router(["static-1"], settings=RouterSettings(host_ttl=10.0), clock=clock)
    for i in range(5):
        router.update(f"h{i}", _vol(str(uuid.uuid4())), 1)
    clock.now += 11.0
    router.update("fresh", _vol(), 1)  # a sweep runs at most every ttl/4 on updates
    assert router.known_hosts() == ["fresh", "static-1"]
    assert set(router._hosts) == {"fresh"}


def test_volume_of_an_expired_holder_goes_to_a_host_that_answered_for_it(
    router: Router, clock: Clock, hosts: Hosts
) -> None:
    _held_by(router, "host-a")
    hosts.answers["host-b"] = (VOL,)
    router.update("host-b", _vol(), 1)
    router.verify_pending()  # host-b answers; host-a is asked and (down) loses VOL to it
    assert router.host_for_volume(VOL) == "host-b"
    clock.now += 100.0
    router.update("host-b", _vol(), 1)
    clock.now += 100.0  # host-a long expired, host-b alive
    assert router.host_for_volume(VOL) == "host-b"


# -- claims ----------------------------------------------------------------------------------
def test_rogue_generation_1_claim_does_not_redirect(router: Router, hosts: Hosts) -> None:
    """Old: ``aaa-rogue`` sorts first by name and took the volume at once."""
    hosts.answers["host-a"] = (VOL,)
    _held_by(router, "host-a")
    assert router.update("aaa-rogue", _vol(), 1)
    assert router.host_for_volume(VOL) == "host-a"
    assert router.host_for_instance(INST) == "host-a"
    assert router.verify_pending() == ["aaa-rogue"]  # it does not answer: refuted
    assert router.host_for_volume(VOL) == "host-a"
    assert router._hosts["aaa-rogue"].claims == frozenset()


def test_rogue_that_answers_without_the_volume_does_not_redirect(
    router: Router, hosts: Hosts
) -> None:
    hosts.answers["aaa-rogue"] = ()
    _held_by(router, "host-a")
    router.update("aaa-rogue", _vol(), 7)
    router.verify_pending()
    assert router.host_for_volume(VOL) == "host-a"


@pytest.mark.parametrize("generation", [0, 1, 10**12])
def test_spoofed_empty_inventory_of_the_holder_cannot_black_hole(
    router: Router, hosts: Hosts, generation: int
) -> None:
    """Old: a generation <= 1 update (or any newer one) naming nothing made VOL unroutable,
    and a raised generation made the real host's later updates be dropped as stale."""
    hosts.answers["host-a"] = (VOL,)
    _held_by(router, "host-a")
    assert router.update("host-a", [], generation)
    assert router.host_for_volume(VOL) == "host-a"  # not believed before the host answers
    assert router.verify_pending() == ["host-a"]
    assert router.host_for_volume(VOL) == "host-a"  # it answers: VOL is still there
    # the real host's next publication is heard, whatever generation the spoof claimed
    assert router.update("host-a", [*_vol(), *_vol(VOL_B, INST_B)], 6)
    assert router.host_for_volume(VOL_B) == "host-a"


def test_restart_claim_contradicting_the_holder_waits_for_an_answer(
    router: Router, hosts: Hosts
) -> None:
    """A host that restarted (generation 1) claiming a volume another live host holds: a
    stale claim; the restarted host's own answer does not name it, so nothing moves."""
    hosts.answers["host-a"] = (VOL,)
    hosts.answers["host-b"] = (VOL_B,)
    _held_by(router, "host-a")
    router.update("host-b", [*_vol(), *_vol(VOL_B, INST_B)], 1)
    assert router.host_for_volume(VOL) == "host-a"
    assert router.host_for_volume(VOL_B) == "host-b"  # uncontested: believed at once
    assert router.verify_pending() == ["host-b"]
    assert router.host_for_volume(VOL) == "host-a"


def test_verified_claim_moves_when_the_holder_no_longer_answers_for_it(
    router: Router, hosts: Hosts
) -> None:
    """A real move (migration): the new host answers for VOL, the old one no longer does."""
    hosts.answers["host-a"] = ()
    hosts.answers["host-b"] = (VOL,)
    _held_by(router, "host-a")
    router.update("host-b", _vol(), 3)
    assert router.host_for_volume(VOL) == "host-a"
    assert router.verify_pending() == ["host-b", "host-a"]
    assert router.host_for_volume(VOL) == "host-b"


def test_both_answer_the_holder_keeps_it_whatever_the_names(router: Router, hosts: Hosts) -> None:
    """Old: the first host by name ("aaa") won."""
    hosts.answers["zzz-holder"] = (VOL,)
    hosts.answers["aaa-claimant"] = (VOL,)
    _held_by(router, "zzz-holder")
    router.update("aaa-claimant", _vol(), 1)
    router.verify_pending()
    assert router.host_for_volume(VOL) == "zzz-holder"


def test_holder_that_does_not_answer_loses_to_a_host_that_does(
    router: Router, hosts: Hosts
) -> None:
    hosts.answers["host-b"] = (VOL,)
    _held_by(router, "host-a")  # host-a is down (no answer)
    router.update("host-b", _vol(), 1)
    assert router.verify_pending() == ["host-b", "host-a"]
    assert router.host_for_volume(VOL) == "host-b"


def test_removal_is_believed_once_the_host_answers_without_it(router: Router, hosts: Hosts) -> None:
    hosts.answers["host-a"] = ()
    _held_by(router, "host-a")
    router.update("host-a", [], 6)
    assert router.host_for_volume(VOL) == "host-a"
    router.verify_pending()
    with pytest.raises(NotRouted):
        router.host_for_volume(VOL)


def test_stale_generation_is_dropped_and_the_host_asked(router: Router, hosts: Hosts) -> None:
    hosts.answers["host-a"] = (VOL,)
    _held_by(router, "host-a")
    assert not router.update("host-a", [], 4)
    assert router.verify_pending() == ["host-a"]
    assert router.host_for_volume(VOL) == "host-a"


def test_without_a_probe_changed_claims_are_never_believed(clock: Clock) -> None:
    router = Router(clock=clock)
    router.update("zzz", _vol(), 5)
    router.update("aaa", _vol(), 1)
    router.update("zzz", [], 1)
    assert router.host_for_volume(VOL) == "zzz"


def test_two_unverified_claimants_of_a_free_volume_are_not_decided_by_name(
    router: Router, clock: Clock, hosts: Hosts
) -> None:
    hosts.answers["host-b"] = (VOL,)
    _held_by(router, "host-a")
    router.update("aaa-rogue", _vol(), 1)
    router.update("host-b", _vol(), 1)
    router._due.clear()  # their queued probes have not run yet
    clock.now += 100.0
    router.update("aaa-rogue", _vol(), 1)
    router.update("host-b", _vol(), 1)
    clock.now += 100.0  # host-a expired; both claim VOL and neither answered yet
    with pytest.raises(Unverified, match="aaa-rogue, host-b"):
        router.host_for_volume(VOL)
    assert sorted(router.verify_pending()) == ["aaa-rogue", "host-b"]
    assert router.host_for_volume(VOL) == "host-b"
    router.update("aaa-rogue", _vol(), 1)  # the rogue again: host-b answered for VOL
    assert router.host_for_volume(VOL) == "host-b"


def test_malformed_or_huge_inventories_are_ignored(router: Router) -> None:
    assert not router.update("h", [{"volume_id": VOL}], 1)
    assert not router.update("h", _vol(), "x")  # type: ignore[arg-type]
    many = [{"volume_id": str(uuid.uuid4()), "instance_uuid": INST} for _ in range(10001)]
    assert not router.update("h", many, 1)
    assert router.known_hosts() == []


# -- bounds ----------------------------------------------------------------------------------
def test_junk_hosts_are_capped_logged_and_expire(
    router: Router, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Old: 20,000 junk host names were all kept forever."""
    caplog.set_level(logging.WARNING, "api_ext.router")
    _held_by(router, "host-a")
    for _ in range(20000):
        router.update(f"junk-{uuid.uuid4().hex}", _vol(str(uuid.uuid4())), 1)
    assert len(router.known_hosts()) == 100
    assert len(router._hosts) == 100
    warnings = [r.getMessage() for r in caplog.records if "max_hosts" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited
    assert "[api] max_hosts is 100" in warnings[0]
    assert router.host_for_volume(VOL) == "host-a"
    clock.now += 181.0
    assert router.update("host-new", _vol(VOL_B, INST_B), 1)  # the junk expired: room again
    assert router.known_hosts() == ["host-new"]
    assert len(router._hosts) == 1


def test_probe_queue_is_bounded_and_rate_limited(
    router: Router, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "api_ext.router")
    router.configure(RouterSettings(max_hosts=1000))
    _held_by(router, "host-a")
    for i in range(MAX_PENDING + 50):
        router.update(f"rogue-{i}", _vol(), 1)
    assert len(router._due) == MAX_PENDING
    assert any("dropped" in r.getMessage() for r in caplog.records)
    router._due.clear()
    router.update("host-a", [], 6)
    router.verify_pending()
    router.update("host-a", [], 7)
    assert router._due["host-a"] == clock.now + REPROBE_INTERVAL


def test_background_thread_verifies_and_stops(hosts: Hosts) -> None:
    hosts.answers["host-b"] = (VOL,)
    router = Router(probe=hosts)
    router.update("host-a", _vol(), 5)  # down
    router.update("host-b", _vol(), 1)
    deadline = time.monotonic() + 5
    while router.host_for_volume(VOL) != "host-b":
        assert time.monotonic() < deadline, hosts.asked
        time.sleep(0.02)
    router.close()
    assert router._thread is not None and not router._thread.is_alive()


def test_settings_come_from_the_api_conf_through_the_server() -> None:
    conf = make_conf(
        overrides={
            "api.host_ttl": 30.0,
            "api.host_timeout": 2.0,
            "api.max_hosts": 7,
            "transport_url": "fake://",
        }
    )
    assert RouterSettings.from_conf(conf) == RouterSettings(30.0, 2.0, 7)
    assert RouterSettings.from_conf(object()) == RouterSettings()
    from api_ext.server import ApiServer

    transport = get_transport(conf)
    try:  # the server builds its router from [api] (nothing is started or bound here)
        assert ApiServer(conf, transport).router.settings == RouterSettings(30.0, 2.0, 7)
    finally:
        transport.cleanup()


def test_agent_client_with_timeout_is_bounded() -> None:
    conf = make_conf(overrides={"transport_url": "fake://"})
    transport = get_transport(conf)
    try:
        slow = AgentAPI(transport, "nobody", timeout=60)
        quick = slow.with_timeout(0.2)
        assert (quick.host, quick._client.timeout, slow._client.timeout) == ("nobody", 0.2, 60)
        start = time.monotonic()
        with pytest.raises(om.MessagingTimeout):
            quick.get_inventory({})
        assert time.monotonic() - start < 3
    finally:
        transport.cleanup()


# -- the operation look-up -------------------------------------------------------------------
class SilentAgent(FakeAgent):
    """A host whose agent never answers: each call blocks ``hang`` s, then times out."""

    def __init__(self, host: str, hang: float) -> None:
        super().__init__(host)
        self.hang = hang
        self.timeouts: list[float] = []

    def with_timeout(self, timeout: float) -> SilentAgent:
        self.timeouts.append(timeout)
        return self

    def _record(self, name: str, args: Any) -> None:
        super()._record(name, args)
        time.sleep(self.hang)
        raise om.MessagingTimeout(f"{self.host} did not answer")


def _app(router: Router, agents: dict[str, FakeAgent], tmp: Any) -> webtest.TestApp:
    conf = make_conf(
        overrides={"api.auth_strategy": "noauth", "api.policy_file": str(tmp / "none.yaml")}
    )
    inner = ApiApp(router, agents.__getitem__, auth.make_enforcer(conf))
    return webtest.TestApp(auth.wrap(inner, conf))


@pytest.fixture
def lookup(
    clock: Clock, tmp_path: Any
) -> Callable[[dict[str, FakeAgent]], tuple[webtest.TestApp, Router]]:
    def make(agents: dict[str, FakeAgent]) -> tuple[webtest.TestApp, Router]:
        router = Router(settings=RouterSettings(host_timeout=0.3), clock=clock, background=False)
        for i, name in enumerate(agents):
            router.update(name, _vol(str(uuid.uuid4()), str(uuid.uuid4())), i + 2)
        return _app(router, agents, tmp_path), router

    return make


def test_get_operation_skips_a_silent_host_within_the_timeout(lookup: Any) -> None:
    """Old: ``aaa-dead`` is asked first by name; its timeout made the look-up answer 503."""
    dead = SilentAgent("aaa-dead", hang=0.1)
    live = FakeAgent("bbb-live")
    live.ops = [op("op1", "bbb-live", "running")]
    app, _ = lookup({"aaa-dead": dead, "bbb-live": live})
    body = app.get("/v1/operations/op1", headers=ADMIN).json
    assert body["operation"]["host"] == "bbb-live"
    assert dead.timeouts == [0.3]  # the host was asked with the bounded timeout


def test_cancel_skips_a_silent_host(lookup: Any) -> None:
    dead = SilentAgent("aaa-dead", hang=0.1)
    live = FakeAgent("bbb-live")
    live.ops = [op("op1", "bbb-live", "running", kind=api.OperationKind.BACKUP)]
    app, _ = lookup({"aaa-dead": dead, "bbb-live": live})
    resp = app.post("/v1/operations/op1/cancel", headers=ADMIN)
    assert resp.status_int == 202
    resp = app.post("/v1/operations/op1/cancel", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 409  # a host that knows it refuses: that answer stands


def test_unknown_operation_with_a_silent_host_is_404_naming_it(lookup: Any) -> None:
    dead = SilentAgent("aaa-dead", hang=0.1)
    app, _ = lookup({"aaa-dead": dead, "bbb-live": FakeAgent("bbb-live")})
    resp = app.get("/v1/operations/nope", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert "no answer from aaa-dead" in resp.json["itemNotFound"]["message"]


def test_a_host_that_ignores_the_timeout_is_cut_off(lookup: Any) -> None:
    """A client without ``with_timeout`` hanging far longer: the wall clock still bounds it."""
    hung = FakeAgent("aaa-hung")
    hung.raise_ = om.MessagingTimeout("late")
    hung._record = lambda name, args: time.sleep(5)  # type: ignore[method-assign]
    live = FakeAgent("bbb-live")
    app, _ = lookup({"aaa-hung": hung, "bbb-live": live})
    start = time.monotonic()
    resp = app.get("/v1/operations/nope", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 404
    assert time.monotonic() - start < 3  # 0.3 s per round + 1 s, not 5 s


def test_pinned_silent_host_is_still_503(lookup: Any) -> None:
    app, _ = lookup({"aaa-dead": SilentAgent("aaa-dead", hang=0), "b": FakeAgent("b")})
    resp = app.get("/v1/operations/op1?host=aaa-dead", headers=ADMIN, expect_errors=True)
    assert resp.status_int == 503


def test_expired_hosts_are_not_asked(lookup: Any, clock: Clock) -> None:
    """Old: every host ever heard was asked in every look-up and listing."""
    old, new = FakeAgent("host-old"), FakeAgent("host-new")
    app, router = lookup({"host-old": old, "host-new": new})
    clock.now += 181.0
    router.update("host-new", _vol(VOL_B, INST_B), 9)
    assert app.get("/v1/operations/x1", headers=ADMIN, expect_errors=True).status_int == 404
    assert app.get("/v1/operations", headers=ADMIN).json["operations"] == []
    assert old.calls == []
    assert [name for name, _ in new.calls] == ["get", "list"]
