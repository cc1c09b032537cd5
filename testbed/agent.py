"""A real ``qsnap-agent`` as a child process, for functional tests and benches.

One agent identity (config file, state directory, host name, RPC client) whose processes
run in turn: a start may arm the test-only crash point (``QSNAP_TEST_CRASH_AT``), so the
kill -9 cycles of the crash tests restart the same identity on the same journal.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hostagent.config import make_conf
from hostagent.journal.crash import CRASH_ENV
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from testbed.service import Service, ServiceError, write_conf

CTX: dict[str, Any] = {"request_id": "req-testbed"}
BUSY = (api.OperationState.QUEUED, api.OperationState.RUNNING)


def noauth_cinder(peer: Any, user_id: str | None = None) -> dict[str, object]:
    """The ``[cinder]`` group for a noauth Cinder: a real ``CinderPeer`` or a ``CinderRecorder``
    (anything with ``endpoint`` and ``project_id``)."""
    group: dict[str, object] = {
        "auth_type": "noauth",
        "endpoint": peer.endpoint,
        "project_id": peer.project_id,
    }
    if user_id is not None:
        group["user_id"] = user_id
    return group


def final(
    client: AgentAPI, op: api.Operation, timeout: float = 90.0, ctx: Mapping[str, Any] = CTX
) -> api.Operation:
    """Poll ``get_operation`` until the operation is no longer queued or running."""
    deadline = time.monotonic() + timeout
    while op.state in BUSY:
        if time.monotonic() > deadline:
            raise TimeoutError(f"operation {op.id} still {op.state}")
        time.sleep(0.3)
        op = client.get_operation(ctx, op.id)
    return op


class AgentProcess:
    """``work/agent.conf`` (groups merged over host, transport, state and allowed roots),
    ``work/agent.log`` (both output streams) and an RPC client in ``api``."""

    def __init__(
        self,
        work: Path,
        transport_url: str,
        roots: Path | str,
        *,
        prefix: str = "agent",
        host: str | None = None,
        state: Path | None = None,
        conf: Mapping[str, Mapping[str, object]] | None = None,
        log: Path | None = None,
        rpc_timeout: float = 60.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.host = host or f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.state = state or work / "state"
        default = {"host": self.host, "transport_url": transport_url, "state_path": self.state}
        sections: dict[str, dict[str, object]] = {
            "DEFAULT": dict(default),
            "shares": {"allowed_roots": roots},
        }
        for group, opts in (conf or {}).items():
            sections[group] = {**sections.get(group, {}), **opts}
        self.conf = write_conf(work / "agent.conf", sections)
        self.service = Service("qsnap-agent", log or work / "agent.log")
        self.log = self.service.log
        self.transport = get_transport(make_conf(), transport_url)
        self.api = self.client(rpc_timeout)
        self.stop_timeout = stop_timeout

    def client(self, timeout: float) -> AgentAPI:
        return AgentAPI(self.transport, self.host, timeout=timeout)

    def start(
        self, crash_at: str | None = None, *, args: Sequence[str] = (), timeout: float = 90.0
    ) -> None:
        """Start a process and wait for its READY line (crash point ``crash_at`` armed)."""
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        argv = [sys.executable, "-m", "hostagent.cli", "--config-file", str(self.conf)]
        self.service.start([*argv, "--ready-line", *args], env=env, timeout=timeout)

    def wait_died(self, timeout: float = 60.0) -> None:
        """The armed crash point fired: the process exited 137, like after a kill -9."""
        rc = self.service.wait(timeout)
        if rc != 137:
            raise ServiceError(f"the armed agent exited {rc}, not 137: {self.tail()}")

    def wait(self, op: api.Operation, timeout: float = 600.0) -> api.Operation:
        return final(self.api, op, timeout)

    def stop(self) -> int | None:
        """SIGTERM the running process (see ``Service.stop``); its exit code."""
        return self.service.stop(self.stop_timeout)

    def tail(self, n: int = 3000) -> str:
        return self.service.tail(n)

    def close(self) -> int | None:
        try:
            return self.stop()
        finally:
            self.transport.cleanup()
