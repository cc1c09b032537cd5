"""Operation notifications from a real ``qsnap-agent`` process over the private RabbitMQ.

The agent's config sets only ``[oslo_messaging_notifications] transport_url`` (no driver),
so this also proves the documented rule: a notification transport alone turns
``messagingv2`` on. One 1-disk guest on a plain directory; an instance snapshot and the
agent-owned delete of it each give a start and an end event with the right payload.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.journal import events as ev
from hostagent.rpc import contract as api
from hostagent.rpc.messaging import messaging
from testbed.agent import AgentProcess, final
from testbed.guest import GuestFactory
from testbed.shares import DirShare

pytestmark = pytest.mark.functional
CTX: dict[str, Any] = {"request_id": "req-notify"}


class Heard:
    """Notifications received on topic ``notifications`` (every priority)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def info(self, ctxt: Any, pub: str, event: str, payload: Any, md: Any) -> None:
        with self.cond:
            self.items.append((pub, event, payload))
            self.cond.notify_all()

    error = info

    def wait_for(self, op_id: str, event: str, timeout: float = 30.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((p for _, e, p in self.items if e == event and p["id"] == op_id), None)

        with self.cond:
            assert self.cond.wait_for(lambda: find() is not None, timeout), self.items
            found = find()
            assert found is not None
            return found


def test_agent_process_publishes_operation_events(
    rabbitmq: Any, dir_guests: GuestFactory, dir_share: DirShare, bed_dir: Path
) -> None:
    g = dir_guests(ndisks=1, size_mib=64)
    url = rabbitmq.transport_url
    agent = AgentProcess(
        bed_dir, url, dir_share.root, prefix="notify", log=bed_dir / "agent.out",
        conf={
            "agent": {"merge_timeout": 120},
            "cinder": {"enabled": "false", "auth_type": "none",
                       "endpoint": "http://127.0.0.1:9/v3"},
            "oslo_messaging_notifications": {"transport_url": url},
        },
    )  # fmt: skip
    om = messaging()
    ntransport = om.get_notification_transport(make_conf(), url=url)
    heard = Heard()
    listener = om.get_notification_listener(
        ntransport, [om.Target(topic="notifications")], [heard], executor="threading"
    )
    listener.start()
    log = bed_dir / "agent.log"
    try:
        agent.start(args=["--debug", "--log-file", str(log)], timeout=60)
        client, host = agent.api, agent.host
        vid = g.disks[0].volume_id

        snap = final(client, client.snapshot_instance(CTX, g.uuid, None, api.Quiesce.REQUIRED), 120)
        assert snap.state is api.OperationState.SUCCEEDED, snap.error
        start = heard.wait_for(snap.id, ev.EVENT_START)
        end = heard.wait_for(snap.id, ev.EVENT_END)
        assert start["kind"] == end["kind"] == "instance_snapshot"
        assert start["instance_uuid"] == g.uuid and start["host"] == host
        assert end["state"] == "succeeded" and end["error"] is None
        assert end["volume_ids"] == [vid]
        (made,) = end["result"]["snapshots"]
        assert made["volume_id"] == vid and made["snapshot_id"]

        dele = final(client, client.delete_snapshot(CTX, vid, made["snapshot_id"]), 120)
        assert dele.state is api.OperationState.SUCCEEDED, dele.error
        heard.wait_for(dele.id, ev.EVENT_START)
        gone = heard.wait_for(dele.id, ev.EVENT_END)
        assert gone["volume_ids"] == [vid] and gone["snapshot_id"] == made["snapshot_id"]
        pubs = {pub for pub, _, p in heard.items if p["id"] in (snap.id, dele.id)}
        assert pubs == {f"qsnap-agent.{host}"}
        assert not [e for _, e, _ in heard.items if e == ev.EVENT_ERROR]
        assert "DEBUG" in log.read_text()  # --debug and --log-file reached oslo.log
    finally:
        rc = agent.close()
        listener.stop()
        listener.wait()
        ntransport.cleanup()
    assert rc == 0, log.read_text()[-3000:]
