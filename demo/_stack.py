"""The services of the demo, in this process: agent + API on one ``fake://`` transport.

Why one transport: oslo.messaging's fake driver keeps its queues per transport object, so
the API, the agent and the notification listener must share it to hear each other.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oslo_config import cfg

from api_ext.config import make_conf as api_conf
from api_ext.server import ApiServer
from hostagent.agent import Agent
from hostagent.config import make_conf as agent_conf
from hostagent.rpc.client import get_transport
from hostagent.rpc.messaging import messaging

HOST = "demo-host"
FINAL = ("succeeded", "failed")


def _no_cinder(conf: cfg.ConfigOpts) -> str:
    """``[cinder] enabled = false`` where that option exists; the endpoint points at nothing.

    The endpoint is set either way: the status notifier is built even when disabled, and
    agent-owned snapshots never send assisted-snapshot status reports.
    """
    conf.set_override("auth_type", "none", group="cinder")
    conf.set_override("endpoint", "http://127.0.0.1:9/v3", group="cinder")
    try:
        conf.set_override("enabled", False, group="cinder")
        return "[cinder] enabled = false"
    except cfg.NoSuchOptError:
        return "[cinder] points at nothing (its record calls fail and stay journaled)"


class Stack:
    """Agent + API + a notification listener; ``close()`` stops all of it."""

    def __init__(self, share: Path, state: Path, on_event: Callable[[str, dict[str, Any]], None]):
        logging.getLogger("oslo_messaging.notify").setLevel(logging.ERROR)  # shared transport
        common = {"transport_url": "fake://"}
        self.agent_conf = agent_conf(
            overrides={
                **common,
                "host": HOST,
                "state_path": str(state),
                "shares.allowed_roots": [str(share)],
                "shares.mount_base": str(share),
                "agent.merge_timeout": 120.0,
                "oslo_messaging_notifications.driver": ["messagingv2"],
            }
        )
        self.cinder_note = _no_cinder(self.agent_conf)
        self.api_conf = api_conf(
            overrides={
                **common,
                "api.auth_strategy": "noauth",
                "api.bind_host": "127.0.0.1",
                "api.bind_port": 0,
                "api.hosts": [HOST],
                "api.rpc_timeout": 30.0,
            }
        )
        self._closers: list[Callable[[], None]] = []
        self.transport = get_transport(self.api_conf)
        self._closers.append(self.transport.cleanup)
        try:
            om = messaging()

            class Endpoint:
                def info(self, ctxt: Any, pub: str, event: str, payload: Any, md: Any) -> None:
                    on_event(event, payload)

                def error(self, ctxt: Any, pub: str, event: str, payload: Any, md: Any) -> None:
                    on_event(event, payload)

            listener = om.get_notification_listener(
                self.transport,
                [om.Target(topic="notifications")],
                [Endpoint()],
                executor="threading",
            )
            listener.start()

            def stop_listener() -> None:
                listener.stop()
                listener.wait()

            self._closers.append(stop_listener)
            agent = Agent(
                self.agent_conf, transport=self.transport, notification_transport=self.transport
            )
            self._closers.append(agent.stop)
            agent.start()
            self.agent = agent
            api = ApiServer(self.api_conf, self.transport)
            self.port = api.start()
            self._closers.append(api.stop)
        except BaseException:
            self.close()
            raise
        self.http = Http(f"http://127.0.0.1:{self.port}")

    def close(self) -> None:
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as exc:  # keep closing the rest
                logging.getLogger(__name__).warning("demo cleanup: %s", exc)


class Http:
    """The native API as an admin under noauth (``X-Auth-Token: user:project``)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._headers = {
            "X-Auth-Token": f"demo:{uuid.uuid4().hex}",
            "X-Roles": "admin",
            "Content-Type": "application/json",
        }

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        url = self.base + path  # always http://127.0.0.1:<port>/...
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        return status, parsed if isinstance(parsed, dict) else {"body": parsed}

    def wait(self, op: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
        """Poll ``GET /v1/operations/{id}`` until the operation is final."""
        deadline = time.monotonic() + timeout
        while op.get("state") not in FINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"operation {op.get('id')} still {op.get('state')}")
            time.sleep(0.2)
            # hex form: the API checks ids with isalnum() (dashes refused)
            op_id = str(op["id"]).replace("-", "")
            status, body = self.call("GET", f"/v1/operations/{op_id}?host={HOST}")
            if status != 200:
                raise RuntimeError(f"GET operation {op['id']}: {status} {body}")
            op = body["operation"]
        return op
