"""A real ``qsnap-agent`` process for the backup modules: its config, start (optionally
with a test-only crash point armed), the READY wait, an RPC client, kill/stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hostagent.config import make_conf
from hostagent.journal.crash import CRASH_ENV
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from testbed import procs

ROOT = Path(__file__).resolve().parents[3]
CTX: dict[str, Any] = {"request_id": "req-backup-functional"}


class AgentProcess:
    """One agent identity (conf, state, repository under ``work``); processes in turn.

    ``backup`` adds lines to the ``[backup]`` group (e.g. ``bandwidth_mib = 4``).
    """

    def __init__(
        self,
        share_root: Path,
        rabbit: Any,
        work: Path,
        *,
        workers: int = 2,
        max_parallel: int = 1,
        backup: str = "",
    ) -> None:
        self.host = f"bk-{uuid.uuid4().hex[:6]}"
        self.log, self.conf = work / "agent.log", work / "agent.conf"
        self.state, self.repo = work / "state", work / "repo"
        self.conf.write_text(
            f"[DEFAULT]\nhost = {self.host}\ntransport_url = {rabbit.transport_url}\n"
            f"state_path = {self.state}\n[shares]\nallowed_roots = {share_root}\n"
            f"[agent]\nworkers = {workers}\nmerge_timeout = 120\n[cinder]\nenabled = false\n"
            f"[backup]\nrepository = {self.repo}\nmax_parallel = {max_parallel}\n{backup}"
        )
        self.transport = get_transport(make_conf(), rabbit.transport_url)
        self.api = AgentAPI(self.transport, self.host, timeout=60)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crash_at: str | None = None) -> None:
        """Start a process and wait for its READY line (crash point ``crash_at`` armed)."""
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        env["PYTHONWARNINGS"] = "ignore"
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        seen = self.log.read_bytes().count(b"READY") if self.log.exists() else 0
        argv = [sys.executable, "-m", "hostagent.cli", "--config-file", str(self.conf)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*argv, "--ready-line"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        procs.record("qsnap-agent", self.proc.pid)
        deadline = time.monotonic() + 90
        while self.log.read_bytes().count(b"READY") <= seen:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_died(self) -> None:
        """The armed crash point fired: the process exited 137 like a kill -9."""
        assert self.proc is not None
        assert self.proc.wait(60) == 137, self.tail()
        self.proc = None

    def wait(self, op: api.Operation, timeout: float = 600) -> api.Operation:
        deadline = time.monotonic() + timeout
        while op.state in (api.OperationState.QUEUED, api.OperationState.RUNNING):
            assert time.monotonic() < deadline, f"operation {op.id} still {op.state}"
            time.sleep(0.3)
            op = self.api.get_operation(CTX, op.id)
        return op

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.transport.cleanup()
