"""Processes of the Nova peer: schema syncs and the services, started, awaited and stopped by pid.

Each service runs in its own session (process group) so a stop can end what it spawned: the
privsep helpers of nova-compute live in its group, and nova-compute does not exit on SIGTERM
in useful time (seen > 18 s), hence TERM, a short wait, then KILL of the group. Every pid is
recorded with ``procs.record`` for the leftover audit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed import procs
from testbed.mariadb import MariaDB
from testbed.nova_conf import REPO, VENV, NovaFiles, Ports


class NovaBedError(RuntimeError):
    """A piece of the Nova peer did not come up, or did not do what it was asked in time."""


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path.name})"
    return f"--- {path.name} (last {n} lines)\n" + "\n".join(lines[-n:])


class Proc:
    """One long-running child in its own process group, output in ``log``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                list(argv), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=log.parent,
            )  # fmt: skip
        procs.record(name, self.popen.pid)

    def running(self) -> bool:
        return self.popen.poll() is None

    def check(self, extra_log: Path | None = None) -> None:
        if not self.running():
            logs = tail(self.log) + ("\n" + tail(extra_log) if extra_log else "")
            raise NovaBedError(f"{self.name} exited rc={self.popen.returncode}:\n{logs}")

    def stop(self, timeout: float = 10.0) -> None:
        """TERM the group, KILL it after ``timeout``; the group also holds privsep helpers."""
        if self.running():
            procs.stop(self.popen.pid, timeout=timeout, group=True)
        else:
            try:  # the leader is gone; its group (privsep helpers) may not be
                os.killpg(self.popen.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        procs.forget(self.name, self.popen.pid)


def nova_env(files: NovaFiles) -> dict[str, str]:
    """PATH: the shims (sudo, mount) first, then the venv (privsep-helper); the repo on
    PYTHONPATH for the test-bed auth middleware (testbed.nova_auth) and api_ext."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHON"))}
    env["PATH"] = f"{files.bin}:{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(REPO)
    env["OS_NOVA_CONFIG_DIR"] = str(files.base)
    env["OS_NOVA_CONFIG_FILES"] = f"api-paste.ini;{files.nova_conf.name}"  # paste file first
    env["OS_PLACEMENT_CONFIG_DIR"] = str(files.placement_dir)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(argv: Sequence[str], env: Mapping[str, str], log: Path, timeout: float = 180) -> None:
    """A one-shot command (a schema sync), its output appended to ``log``."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        res = subprocess.run(
            list(argv), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=timeout,
        )  # fmt: skip
    if res.returncode != 0:
        raise NovaBedError(f"{argv[0]} {' '.join(argv[1:4])} failed rc={res.returncode}:\n"
                           + tail(log))  # fmt: skip


def init_databases(
    db: MariaDB, files: NovaFiles, env: Mapping[str, str], transport_url: Callable[[], str]
) -> float:
    """Create and sync Placement's, the API's, cell0's and cell1's schemas (in parallel: they
    are independent), map cell0 and create cell1 (``transport_url()`` may block until
    RabbitMQ is up). Returns the seconds it took."""
    t0 = time.monotonic()
    db.create("placement", "nova_api", "nova_cell0", "nova_cell1")
    manage = str(VENV / "bin" / "nova-manage")
    conf = ["--config-file", str(files.nova_conf)]
    log = files.logs / "nova-manage.log"

    def api_and_cells() -> None:
        run([manage, *conf, "api_db", "sync"], env, log)
        run([manage, *conf, "cell_v2", "map_cell0", "--database_connection",
             db.url("nova_cell0")], env, log)  # fmt: skip
        # before any service starts: nova-api and the scheduler cache the cell list
        run([manage, *conf, "cell_v2", "create_cell", "--name", "cell1", "--verbose",
             "--transport-url", transport_url()], env, log)  # fmt: skip

    def sync(argv: list[str], logname: str) -> Callable[[], None]:
        return lambda: run(argv, env, files.logs / logname)

    placement = [str(VENV / "bin" / "placement-manage"), "--config-file",
                 str(files.placement_dir / "placement.conf"), "db", "sync"]  # fmt: skip
    cell0 = ["--config-file", str(files.cell0_conf)]
    jobs: list[Callable[[], None]] = [
        api_and_cells,
        sync([manage, *conf, "db", "sync", "--local_cell"], "nova-manage-cell1.log"),
        sync([manage, *cell0, "db", "sync", "--local_cell"], "nova-manage-cell0.log"),
        sync(placement, "placement-manage.log"),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for fut in [pool.submit(j) for j in jobs]:
            fut.result()
    return time.monotonic() - t0


def http_json(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, Any]:
    """One request; (status, parsed JSON body or None). HTTP errors are answers, not raises."""
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Accept": "application/json", **(headers or {})}
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    # our own http:// endpoints on 127.0.0.1
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_queue(amqp_url: str, queue: str, deadline: float, alive: Callable[[], None]) -> None:
    """Until RabbitMQ has ``queue`` (an RPC server declared it: messages sent to its topic
    from now on wait for it instead of being dropped and timing out)."""
    kombu: Any = importlib.import_module("kombu")
    with kombu.Connection(amqp_url, connect_timeout=5) as conn:
        while True:
            alive()
            channel = conn.channel()
            try:
                channel.queue_declare(queue=queue, passive=True)
                return
            except conn.channel_errors:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            if time.monotonic() > deadline:
                raise NovaBedError(f"no RPC queue {queue!r} on RabbitMQ in time")
            time.sleep(0.2)


class Services:
    """Placement, nova-api, nova-conductor, nova-scheduler and nova-compute of one cloud."""

    def __init__(self, files: NovaFiles, env: Mapping[str, str], ports: Ports, driver: str):
        self.files = files
        self.env = env
        self.ports = ports
        self.driver = driver
        self.procs: dict[str, Proc] = {}
        py = str(VENV / "bin" / "python")
        wsgi = str(files.base / "wsgi_serve.py")
        conf = ["--config-file", str(files.nova_conf)]
        self.argv: dict[str, list[str]] = {
            "placement-api": [py, wsgi, "placement.wsgi.api:application", str(ports.placement)],
            "nova-api": [py, wsgi, "nova.wsgi.osapi_compute:application", str(ports.api)],
            "nova-conductor": [str(VENV / "bin" / "nova-conductor"), *conf],
            "nova-scheduler": [str(VENV / "bin" / "nova-scheduler"), *conf],
            "nova-compute": [py, str(files.base / "compute_launch.py"), driver, *conf],
        }

    def log(self, name: str) -> Path:
        """oslo.log's file; nova-api (no --log-file under WSGI) logs to its output file."""
        return self.files.logs / f"{name}.{'out' if name == 'nova-api' else 'log'}"

    def start(self, name: str) -> Proc:
        argv = list(self.argv[name])
        if name in ("nova-conductor", "nova-scheduler", "nova-compute"):
            argv += ["--log-file", str(self.log(name))]
        out = self.files.logs / f"{name}.out"
        proc = self.procs[name] = Proc(name, argv, self.env, out)
        return proc

    def start_all(self) -> None:
        for name in self.argv:
            self.start(name)

    def check(self) -> None:
        for name, proc in self.procs.items():
            proc.check(self.log(name))

    def wait_http(self, name: str, url: str, headers: Mapping[str, str], deadline: float) -> None:
        while True:
            self.procs[name].check(self.log(name))
            try:
                status, _ = http_json("GET", url, headers=headers, timeout=5)
                if status < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NovaBedError(f"{name} not answering on {url}:\n{self.tails(name)}")
            time.sleep(0.1)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop(timeout)

    def restart(self, name: str) -> Proc:
        self.stop(name, timeout=3.0 if name == "nova-compute" else 10.0)
        return self.start(name)

    def stop_all(self) -> None:
        # compute first (it talks to the others while it stops), then the rest together
        self.stop("nova-compute", timeout=3.0)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: self.stop(n, 10.0), list(self.procs)))

    def tails(self, *names: str, n: int = 40) -> str:
        out = []
        for name in names or tuple(self.argv):
            out.append(tail(self.log(name), n))
            out.append(tail(self.files.logs / f"{name}.out", 10))
        return "\n".join(out)
