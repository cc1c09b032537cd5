"""A private RabbitMQ node: its own node name, ports, data dir and epmd.

Nothing is shared with a system RabbitMQ: the node and its epmd run on free ports chosen at
start, both are started in the foreground by us (so we hold their pids) and stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

from testbed import procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RabbitNode:
    """``transport_url`` is ready for oslo.messaging once the constructor returns."""

    def __init__(self, timeout: float = 90.0) -> None:
        self.name = f"qsnap-{procs.run_id()}-{uuid.uuid4().hex[:4]}"
        self.base = procs.run_dir() / self.name
        self.base.mkdir(mode=0o755)
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.transport_url = f"rabbit://guest:guest@127.0.0.1:{self.port}/"
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        env = dict(os.environ)
        env.update(
            {
                "HOME": str(self.base),
                "RABBITMQ_NODENAME": f"{self.name}@localhost",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
            }
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        self._env = env
        log = open(self.base / "epmd.out", "wb")
        self._epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.record("epmd", self._epmd.pid)
        log = open(self.base / "server.out", "wb")
        self._server = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.record("rabbitmq", self._server.pid)
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self._server.poll() is not None or time.monotonic() > deadline:
                out = (self.base / "server.out").read_text(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"RabbitMQ node {self.name} did not start:\n{out}")
            time.sleep(0.1)
        self._wait_amqp(deadline)

    def _wait_amqp(self, deadline: float) -> None:
        """The port opens before the broker accepts logins: wait for a real AMQP session."""
        import kombu

        while True:
            try:
                with kombu.Connection(self.amqp_url, connect_timeout=2) as conn:
                    conn.ensure_connection(max_retries=1)
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self.close()
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        """Stop the node's whole process group (beam + children), then its epmd."""
        for name, proc in (("rabbitmq", self._server), ("epmd", self._epmd)):
            if proc.poll() is None:
                procs.stop(proc.pid, timeout=30, group=True)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            procs.forget(name, proc.pid)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
