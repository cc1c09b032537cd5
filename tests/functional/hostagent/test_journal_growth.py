"""Listings and growth of the journal on real peers: a real ``qsnap-agent`` process over the
private RabbitMQ (libvirtd up, no guest, ``[cinder] enabled = false``).

- Listing: its journal holds 2,000 finished operations (journaled before it starts); while it
  serves, one RUNNING operation older than 500 of them is journaled (one journaled before the
  start would be failed by recovery, as it must). Over RPC it is listed newest first, within
  ``limit=1000`` at its place, and with ``state=running`` even at ``limit=1``; ``limit=1``
  answers one operation. Through a real ``qsnap-api`` the same. A 1.3 agent (an in-process
  endpoint on the same bus refusing 1.4) still gets the newest answered.
- Purge: an agent with ``[journal] purge_age_days`` of ~14 min and a 1 s interval purges the
  old finished operations (steps with them) and keeps the young ones, an old operation with
  an undelivered notice and an old RUNNING one; the sqlite file is read after it stopped.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.journal.model import OperationKind, OperationState
from hostagent.journal.store import Journal
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI
from hostagent.rpc.messaging import messaging
from hostagent.rpc.server import AgentEndpoint
from testbed import procs
from testbed.agent import CTX, AgentProcess
from testbed.service import start_api

pytestmark = pytest.mark.functional

FINISHED = 2000
NEWER = 500  # finished operations newer than the running one
PURGE_AGE_DAYS = 0.01  # 864 s
OLD = 7200.0  # seconds: older than the purge age
OLD_FINISHED = 300


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def work() -> Iterator[Path]:
    d = procs.run_dir() / f"journal-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _agent(work: Path, rabbit: Any, journal: dict[str, object] | None = None) -> AgentProcess:
    return AgentProcess(
        work, rabbit.transport_url, work, prefix="journal",
        conf={
            "DEFAULT": {"use_stderr": "true"},  # oslo.log: stdout carries only the READY line
            "cinder": {"enabled": "false"},
            **({"journal": journal} if journal else {}),
        },
    )  # fmt: skip


def _journal(agent: AgentProcess, clock: Clock) -> Journal:
    agent.state.mkdir(mode=0o700, exist_ok=True)
    return Journal(str(agent.state / "journal.sqlite"), host=agent.host, clock=clock)


def _finished(
    j: Journal, kind: OperationKind, n: int, clock: Clock, step: float = 1.0
) -> list[str]:
    ids = []
    for i in range(n):
        op = j.begin(kind, {"i": i}, locks=[f"volume:{uuid.uuid4()}"]).operation
        j.plan_step(op.id, "restore")
        j.step_done(op.id, 1)
        j.finish(op.id, OperationState.SUCCEEDED, result={"i": i})
        ids.append(str(op.id))
        clock.now += step
    return ids


def test_running_operation_listed_among_2000_finished(
    rabbitmq: Any, libvirt_host: Any, work: Path
) -> None:
    agent = _agent(work, rabbitmq)
    base = time.time() - 3 * FINISHED
    clock = Clock(base)
    t0 = time.monotonic()
    with _journal(agent, clock) as j:
        finished = _finished(j, OperationKind.RESTORE, FINISHED, clock)
    print(f"prefilled {FINISHED} finished operations in {time.monotonic() - t0:.1f} s")
    agent.start(timeout=120)
    api_svc = None
    try:
        # one operation running while the agent serves, 500 finished ones newer than it
        clock.now = base + (FINISHED - NEWER) - 0.5
        with _journal(agent, clock) as j:
            begun = j.begin(OperationKind.BACKUP, {"action": "verify", "backup_id": "b"})
            running = str(j.start(begun.operation.id).id)
        client = agent.api
        newest_first = finished[::-1]

        t0 = time.monotonic()
        top = client.list_operations(CTX, api.OperationFilters(limit=1000))
        t_top = time.monotonic() - t0
        stamps = [o.created_at or "" for o in top]
        assert len(top) == 1000 and stamps == sorted(stamps, reverse=True)
        ids = [o.id for o in top]
        assert ids.index(running) == NEWER and top[NEWER].state is api.OperationState.RUNNING
        assert ids[:NEWER] == newest_first[:NEWER]
        assert top[0].result["steps"][0]["name"] == "restore"  # steps come along

        t0 = time.monotonic()
        (one,) = client.list_operations(CTX, api.OperationFilters(limit=1))
        t_one = time.monotonic() - t0
        assert one.id == newest_first[0]
        only = client.list_operations(
            CTX, api.OperationFilters(state=api.OperationState.RUNNING, limit=1)
        )
        assert [o.id for o in only] == [running]
        default = client.list_operations(CTX)  # limit 100: the newest 100, not the running one
        assert [o.id for o in default] == newest_first[:100]
        print(f"RPC list limit=1000: {t_top:.2f} s, limit=1: {t_one:.3f} s")

        # through a real qsnap-api
        api_svc, url = start_api(
            work, rabbitmq.transport_url,
            {"noauth_roles": "admin", "hosts": agent.host, "rpc_timeout": 60},
            name="qsnap-api-journal", timeout=90,
        )  # fmt: skip
        got = _get(f"{url}/v1/operations?state=running&limit=5")
        assert [o["id"] for o in got["operations"]] == [running] and "failed_hosts" not in got
        got = _get(f"{url}/v1/operations?limit=1000&host={agent.host}")
        assert [o["id"] for o in got["operations"]] == ids
        got = _get(f"{url}/v1/operations?limit=1")
        assert [o["id"] for o in got["operations"]] == [newest_first[0]]

        # a 1.3 agent on the same bus: refuses 1.4 (a RemoteError over RabbitMQ), answers the
        # oldest first at 1.0; the client asks it for 1000 and keeps the newest of those
        _as_agent_1_3(rabbitmq, agent, newest_first)
    finally:
        if api_svc is not None:
            assert api_svc.stop(30) == 0, api_svc.tail()
        rc = agent.close()
    assert rc == 0, agent.tail()


def _get(url: str) -> dict[str, Any]:
    assert url.startswith("http://127.0.0.1:")  # our own test API
    req = urllib.request.Request(url, headers={"X-Auth-Token": "admin:adminproject"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310
        assert resp.status == 200
        out: dict[str, Any] = json.load(resp)
        return out


def _as_agent_1_3(rabbit: Any, agent: AgentProcess, newest_first: list[str]) -> None:
    om = messaging()

    class Endpoint13(AgentEndpoint):
        target = om.Target(version="1.3")

        def list_operations(self, ctxt: dict[str, Any], filters: object) -> list[dict[str, Any]]:
            f = api.OperationFilters.from_wire(filters)
            asked.append(f.limit)
            with Journal(str(agent.state / "journal.sqlite"), host=agent.host) as j:
                found = j.list_operations(limit=f.limit)  # oldest first, as 1.3 did
                return [api.Operation.of(op, ()).to_wire() for op in found]

    asked: list[int] = []
    host = f"{agent.host}-v13"
    server = om.get_rpc_server(
        agent.transport,
        om.Target(topic=api.RPC_TOPIC, server=host),
        [Endpoint13(None)],  # type: ignore[arg-type]
        executor="threading",
        access_policy=om.DefaultRPCAccessPolicy,
    )
    server.start()
    try:
        client = AgentAPI(agent.transport, host, timeout=60)
        two = client.list_operations(CTX, api.OperationFilters(limit=2))
        # the newest of its oldest 1000 (all a 1.3 agent can give from 2,001: why 1.4 exists)
        assert [o.id for o in two] == newest_first[FINISHED - 1000 :][:2] and asked == [1000]
    finally:
        server.stop()
        server.wait()


def test_purge_removes_only_old_finished_operations(
    rabbitmq: Any, libvirt_host: Any, work: Path
) -> None:
    agent = _agent(work, rabbitmq, {"purge_age_days": PURGE_AGE_DAYS, "purge_interval": 1})
    now = time.time()
    clock = Clock(now - OLD)
    with _journal(agent, clock) as j:
        old = _finished(j, OperationKind.RESTORE, OLD_FINISHED, clock, step=0.01)
        (owed,) = _finished(j, OperationKind.BACKUP, 1, clock)
        j.enqueue(str(uuid.uuid4()), "creating", "90%", op_id=uuid.UUID(owed))  # never delivered
        clock.now = now
        young = _finished(j, OperationKind.RESTORE, 5, clock, step=0.01)
    agent.start(timeout=120)
    try:
        _until(lambda: "journal purge: removed" in agent.tail(20000), agent)
        # an old RUNNING operation appears while the agent serves (one journaled before the
        # start would be failed by recovery, so young); then an old finished sentinel: once
        # that is gone, at least one pass ran with the running one there
        clock.now = now - OLD
        with _journal(agent, clock) as j:
            begun = j.begin(OperationKind.BACKUP, {"action": "verify"}).operation
            running = str(j.start(begun.id).id)
            j.plan_step(begun.id, "verify")
            (sentinel,) = _finished(j, OperationKind.RESTORE, 1, clock)
        _until(lambda: sentinel not in _op_ids(agent), agent)
        time.sleep(2.5)  # two more passes
        listed = agent.api.list_operations(CTX, api.OperationFilters(limit=1000))
        assert {o.id for o in listed} == {*young, owed, running}
    finally:
        rc = agent.close()
    assert rc == 0, agent.tail()

    db = sqlite3.connect(f"file:{agent.state / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        states = dict(db.execute("SELECT id, state FROM operations").fetchall())
        assert set(states) == {*young, owed, running}
        assert states[running] == "running" and states[owed] == "succeeded"
        steps = db.execute("SELECT op_id, COUNT(*) FROM steps GROUP BY op_id").fetchall()
        assert dict(steps) == {**dict.fromkeys([*young, owed], 1), running: 1}
        locks = {r[0] for r in db.execute("SELECT op_id FROM operation_locks")}
        assert locks == {*young, owed}
        (pending,) = db.execute("SELECT op_id FROM notifications WHERE state = 'pending'")
        assert pending == (owed,)
    finally:
        db.close()
    log = agent.tail(200000)
    assert f"removed {OLD_FINISHED} final operations (restore: {OLD_FINISHED})" in log
    assert "kept 1 old final operations whose notices are undelivered" in log
    assert not set(old) & set(states)


def _op_ids(agent: AgentProcess) -> set[str]:
    db = sqlite3.connect(f"file:{agent.state / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT id FROM operations")}
    finally:
        db.close()


def _until(cond: Any, agent: AgentProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached: {agent.tail()}")
        time.sleep(0.2)
