"""The agent assembled in-process (libvirt test:///default, oslo.messaging fake://): RPC
answers, journal operations become notifications, stop drains and closes; the CLI hands
oslo.log options through."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hostagent import agent as agent_mod
from hostagent import cli
from hostagent.config import make_conf
from hostagent.journal import events as ev
from hostagent.journal.model import OperationKind, OperationState
from hostagent.rpc.client import AgentAPI, get_transport

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP = "aaaaaaaa-1111-4222-8333-444444444444"


def _conf(tmp_path: Path, **extra: object) -> Any:
    return make_conf(
        overrides={
            "host": "unit-host",
            "state_path": str(tmp_path / "state"),
            "transport_url": "fake://",
            "libvirt.uri": "test:///default",
            "cinder.endpoint": "http://127.0.0.1:9/v3",
            "shares.allowed_roots": [str(tmp_path)],
            **extra,
        }
    )


def test_agent_serves_rpc_and_publishes_operation_events(tmp_path: Path) -> None:
    conf = _conf(tmp_path, **{"oslo_messaging_notifications.driver": ["messagingv2"]})
    om = ev.messaging()
    transport = get_transport(conf)
    got: list[tuple[str, dict[str, Any]]] = []

    class Endpoint:
        def info(self, ctxt: Any, pub: str, event: str, payload: Any, md: Any) -> None:
            got.append((event, payload))

        def error(self, ctxt: Any, pub: str, event: str, payload: Any, md: Any) -> None:
            got.append((event, payload))

    listener = om.get_notification_listener(
        transport, [om.Target(topic="notifications")], [Endpoint()], executor="threading"
    )
    listener.start()
    agent = agent_mod.Agent(conf, transport=transport, notification_transport=transport)
    try:
        with agent:
            client = AgentAPI(transport, "unit-host", timeout=30)
            assert client.get_inventory({}).host == "unit-host"
            assert client.list_operations({}) == []
            req = {"volume_id": VOL, "snapshot_id": SNAP}
            op = agent.journal.begin(OperationKind.ASSISTED_CREATE, req, SNAP).operation
            agent.journal.finish(op.id, OperationState.SUCCEEDED, result={"bytes": 3})
            ops = client.list_operations({})
            assert [o.id for o in ops] == [str(op.id)]
        # stopped: the journal is closed, and the events were drained before that
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.stop()
        listener.wait()
        transport.cleanup()
    assert sorted(e for e, _ in got) == [ev.EVENT_END, ev.EVENT_START]
    end = next(p for e, p in got if e == ev.EVENT_END)
    assert end["result"] == {"bytes": 3} and end["volume_ids"] == [VOL]
    assert end["snapshot_id"] == SNAP and end["host"] == "unit-host"
    with pytest.raises(Exception, match="closed"):
        agent.journal.get(op.id)


def test_agent_without_notifications_and_owned_transport(tmp_path: Path) -> None:
    agent = agent_mod.Agent(_conf(tmp_path))
    assert agent.events is None
    agent.start()
    agent.stop()
    assert (tmp_path / "state" / "journal.sqlite").exists()


def test_cli_passes_oslo_options_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_main(argv: list[str], *, ready: Any = None) -> int:
        conf = make_conf(argv)
        seen.update(debug=conf.debug, log_file=conf.log_file, ready=ready, host=conf.host)
        return 0

    conf_file = tmp_path / "a.conf"
    conf_file.write_text("[DEFAULT]\nhost = from-file\n")
    monkeypatch.setattr(agent_mod, "main", fake_main)
    rc = cli.main(
        ["--config-file", str(conf_file), "--debug", "--log-file", "/tmp/x.log", "--ready-line"]
    )
    assert rc == 0
    assert seen["debug"] is True and seen["log_file"] == "/tmp/x.log"
    assert seen["host"] == "from-file" and seen["ready"] is not None


def test_main_stops_on_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() = Agent + signals: SIGTERM ends it with 0 after a clean stop."""
    import os
    import signal

    conf_file = tmp_path / "a.conf"
    conf_file.write_text(
        f"[DEFAULT]\nhost = sig-host\ntransport_url = fake://\nstate_path = {tmp_path}/s\n"
        f"[libvirt]\nuri = test:///default\n[cinder]\nendpoint = http://127.0.0.1:9/v3\n"
    )
    ready = threading.Event()
    monkeypatch.setattr(agent_mod.oslo_log, "setup", lambda *a, **k: None)

    def fire() -> None:
        ready.wait(30)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=fire)
    t.start()
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert agent_mod.main(["--config-file", str(conf_file)], ready=ready.set) == 0
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
        t.join()
    assert ready.is_set()
