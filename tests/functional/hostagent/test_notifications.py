"""Operation notifications from a real ``qsnap-agent`` process over the private RabbitMQ.

The agent's config sets only ``[oslo_messaging_notifications] transport_url`` (no driver),
so this also proves the documented rule: a notification transport alone turns
``messagingv2`` on. One 1-disk guest on a plain directory; an instance snapshot and the
agent-owned delete of it each give a start and an end event with the right payload.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.journal import events as ev
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from hostagent.rpc.messaging import messaging
from testbed.guest import GuestFactory
from testbed.shares import DirShare

pytestmark = pytest.mark.functional
ROOT = Path(__file__).resolve().parents[3]
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


@pytest.fixture(scope="module")
def dir_guest(libvirt_host: Any, guest_image: Any) -> Iterator[Any]:
    share = DirShare()
    factory = GuestFactory(libvirt_host.connection, guest_image, lambda: share.new_dir("guest"))
    try:
        yield factory(ndisks=1, size_mib=64), share
    finally:
        factory.close()
        share.close()


def _final(client: AgentAPI, op: api.Operation, timeout: float = 120.0) -> api.Operation:
    deadline = time.monotonic() + timeout
    while op.state not in (api.OperationState.SUCCEEDED, api.OperationState.FAILED):
        assert time.monotonic() < deadline, f"operation {op.id} still {op.state}"
        time.sleep(0.3)
        op = client.get_operation(CTX, op.id)
    return op


def test_agent_process_publishes_operation_events(
    rabbitmq: Any, dir_guest: Any, bed_dir: Path
) -> None:
    g, share = dir_guest
    host = f"notify-{uuid.uuid4().hex[:6]}"
    url = rabbitmq.transport_url
    conf_file = bed_dir / "agent.conf"
    conf_file.write_text(
        f"[DEFAULT]\nhost = {host}\ntransport_url = {url}\nstate_path = {bed_dir / 'state'}\n"
        f"[shares]\nallowed_roots = {share.root}\n[agent]\nmerge_timeout = 120\n"
        f"[cinder]\nenabled = false\nauth_type = none\nendpoint = http://127.0.0.1:9/v3\n"
        f"[oslo_messaging_notifications]\ntransport_url = {url}\n"
    )
    om = messaging()
    conf = make_conf()
    ntransport = om.get_notification_transport(conf, url=url)
    heard = Heard()
    listener = om.get_notification_listener(
        ntransport, [om.Target(topic="notifications")], [heard], executor="threading"
    )
    listener.start()
    log = bed_dir / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostagent.cli", "--config-file", str(conf_file), "--ready-line",
         "--debug", "--log-file", str(log)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    transport = get_transport(conf, url)
    try:
        assert proc.stdout is not None
        deadline, line = time.monotonic() + 60, ""
        while time.monotonic() < deadline and proc.poll() is None and line.strip() != "READY":
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        assert line.strip() == "READY", log.read_text()[-3000:] if log.exists() else "no log"
        client = AgentAPI(transport, host, timeout=60)
        vid = g.disks[0].volume_id

        snap = _final(client, client.snapshot_instance(CTX, g.uuid, None, api.Quiesce.REQUIRED))
        assert snap.state is api.OperationState.SUCCEEDED, snap.error
        start = heard.wait_for(snap.id, ev.EVENT_START)
        end = heard.wait_for(snap.id, ev.EVENT_END)
        assert start["kind"] == end["kind"] == "instance_snapshot"
        assert start["instance_uuid"] == g.uuid and start["host"] == host
        assert end["state"] == "succeeded" and end["error"] is None
        assert end["volume_ids"] == [vid]
        (made,) = end["result"]["snapshots"]
        assert made["volume_id"] == vid and made["snapshot_id"]

        dele = _final(client, client.delete_snapshot(CTX, vid, made["snapshot_id"]))
        assert dele.state is api.OperationState.SUCCEEDED, dele.error
        heard.wait_for(dele.id, ev.EVENT_START)
        gone = heard.wait_for(dele.id, ev.EVENT_END)
        assert gone["volume_ids"] == [vid] and gone["snapshot_id"] == made["snapshot_id"]
        pubs = {pub for pub, _, p in heard.items if p["id"] in (snap.id, dele.id)}
        assert pubs == {f"qsnap-agent.{host}"}
        assert not [e for _, e, _ in heard.items if e == ev.EVENT_ERROR]
        assert "DEBUG" in log.read_text()  # --debug and --log-file reached oslo.log
    finally:
        transport.cleanup()
        proc.terminate()
        rc = proc.wait(timeout=60)
        listener.stop()
        listener.wait()
        ntransport.cleanup()
    assert rc == 0, log.read_text()[-3000:]
