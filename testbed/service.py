"""Child processes that print a ``READY`` line once they serve (qsnap-agent, qsnap-api, the
stub agent): started, awaited and stopped by pid, all their output kept in one log file.

Why a file and not pipes: a pipe nobody drains blocks a chatty child, and the file stays
for post-mortems. READY is looked for from where this start began, so one log can hold a
service's successive lives (the kill -9 cycles of the crash tests).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from testbed import procs

REPO = Path(__file__).resolve().parents[1]


class ServiceError(RuntimeError):
    """A child did not start, did not end, or ended with an unexpected exit code."""


def write_conf(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """An oslo.config file from ``{"DEFAULT": {"host": "h"}, "agent": {"workers": 2}}``."""
    path.write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in opts.items())
            for group, opts in sections.items()
        )
    )
    return path


class Service:
    """One named child at a time; ``start`` again after it ended runs a new life."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 90.0
    ) -> str:
        """Run ``argv`` from the repository root; return its READY line (``READY <port>``).

        faulthandler is on so that a hung shutdown can be made to talk (see :meth:`stop`).
        """
        environ = dict(os.environ if env is None else env)
        environ.update(PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                list(argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=environ,
            )  # fmt: skip
        procs.record(self.name, self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            running = self.proc.poll() is None  # before the read: READY then exit counts
            line = self._ready_line(offset)
            if line is not None:
                return line
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.kill()
        raise ServiceError(f"{self.name} did not start: {self.tail()}")

    def _ready_line(self, offset: int) -> str | None:
        with self.log.open("rb") as f:
            f.seek(offset)
            for raw in f:
                line = raw.decode(errors="replace").strip()
                if line.split(maxsplit=1)[:1] == ["READY"]:
                    return line
        return None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    def wait(self, timeout: float) -> int:
        """The exit code of a child that ends by itself; killed after ``timeout``."""
        if self.proc is None:
            raise ServiceError(f"{self.name} is not running")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise ServiceError(
                f"{self.name} still running after {timeout}s: {self.tail()}"
            ) from exc
        self._forget()
        return rc

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; a hang gets SIGABRT (faulthandler dumps every thread into the
        log), then SIGKILL. Returns the exit code (negative: killed by that signal), or
        None when no child was there to stop."""
        proc = self.proc
        if proc is None:
            return None
        try:
            proc.terminate()  # a no-op once it has exited
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                try:
                    return proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
        finally:
            self._forget()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._forget()

    def _forget(self) -> None:
        if self.proc is not None:
            procs.forget(self.name, self.proc.pid)
            self.proc = None


def start_api(
    logdir: Path,
    transport_url: str,
    api: Mapping[str, object],
    *,
    name: str = "qsnap-api",
    timeout: float = 90.0,
) -> tuple[Service, str]:
    """qsnap-api (noauth, a free port on 127.0.0.1) with more ``[api]`` options ``api``;
    the running service and its URL."""
    conf = write_conf(
        logdir / f"{name}.conf",
        {
            "DEFAULT": {"transport_url": transport_url},
            "api": {"bind_host": "127.0.0.1", "bind_port": 0, "auth_strategy": "noauth", **api},
        },
    )
    svc = Service(name, logdir / f"{name}.log")
    argv = [sys.executable, "-m", "api_ext.server", "--config-file", str(conf), "--ready-line"]
    line = svc.start(argv, timeout=timeout)
    return svc, f"http://127.0.0.1:{line.split()[1]}"
