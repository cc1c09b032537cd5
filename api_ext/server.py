"""``qsnap-api``: the REST API service (Nova-compatible assisted snapshots, native /v1).

Stack: WebOb + Routes for the application (what Nova and Cinder use, so request parsing,
faults and routing behave as the peers expect) served by cheroot, a maintained, pure-Python,
thread-pooled HTTP/1.1 WSGI server (CherryPy's). oslo.service's wsgi server was not chosen:
it is eventlet-based, and this project runs oslo.messaging on the threading backend.
cheroot also bounds request bodies itself (``max_request_body_size``), in front of the app's
own 413. One process: HTTP threads + an oslo.messaging listener for the agents' inventory.
:class:`ApiServer` is that process as an object over a given transport, so ``make demo`` can
run it beside an in-process agent on one ``fake://`` transport; :func:`serve` adds signals.
Arguments other than ``--ready-line`` go to oslo.config (``--config-file``, oslo.log's
``--debug``/``--log-file``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from api_ext import auth
from api_ext.app import AgentClient, ApiApp
from api_ext.config import make_conf
from api_ext.router import InventoryListener, Router, RouterSettings
from hostagent.rpc.client import AgentAPI, get_transport

LOG = logging.getLogger(__name__)


class _Agents:
    """One cached RPC client per host (clients are cheap but hold a prepared target)."""

    def __init__(self, transport: Any, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self._clients: dict[str, AgentAPI] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str) -> AgentClient:
        with self._lock:
            client = self._clients.get(host)
            if client is None:
                client = AgentAPI(self._transport, host, timeout=self._timeout)
                self._clients[host] = client
            return client


class ApiServer:
    """The WSGI server and inventory listener for ``conf`` on ``transport`` (not owned)."""

    def __init__(self, conf: cfg.ConfigOpts, transport: Any) -> None:
        from cheroot import wsgi

        self.conf = conf
        agents = _Agents(transport, conf.api.rpc_timeout)
        settings = RouterSettings.from_conf(conf)
        probe_timeout = min(settings.host_timeout, conf.api.rpc_timeout)
        self.router = Router(
            conf.api.hosts,
            probe=lambda host: AgentAPI(transport, host, timeout=probe_timeout).get_inventory({}),
            settings=settings,
        )
        self._listener = InventoryListener(transport, self.router)
        app = ApiApp(
            self.router, agents, auth.make_enforcer(conf), max_body=conf.api.max_request_body_size
        )
        self._server = wsgi.Server(
            (conf.api.bind_host, conf.api.bind_port),
            auth.wrap(app, conf),
            numthreads=conf.api.threads,
            server_name="qsnap-api",
        )
        self._server.max_request_body_size = conf.api.max_request_body_size
        self._server.max_request_header_size = conf.api.max_request_header_size
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Listen (port 0 picks a free one), serve in a thread; returns the port."""
        self._listener.start()
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, name="http", daemon=True)
        self._thread.start()
        host, self.port = self._server.bind_addr[:2]
        LOG.info(
            "qsnap-api listening on %s:%s (auth %s)", host, self.port, self.conf.api.auth_strategy
        )
        return self.port

    def stop(self) -> None:
        self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._listener.stop()


def serve(argv: Sequence[str] = (), *, ready_line: bool = False) -> int:
    from oslo_log import log as oslo_log

    conf = make_conf(argv)
    if ready_line:  # stdout carries the ready line: console logs go to stderr
        conf.set_override("use_stderr", True)
    oslo_log.setup(conf, "qsnap")
    transport = get_transport(conf)
    try:
        server = ApiServer(conf, transport)  # checks noauth before anything binds or listens
    except auth.UnsafeConfiguration as exc:
        LOG.error("qsnap-api refuses to start: %s", exc)
        print(f"qsnap-api: refusing to start: {exc}", file=sys.stderr, flush=True)
        transport.cleanup()
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    if ready_line:
        print(f"READY {port}", flush=True)
    while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
        pass
    server.stop()
    transport.cleanup()
    return 0


DESCRIPTION = (
    "qsnap REST API: Nova-compatible os-assisted-volume-snapshots and the native /v1 API; "
    "routes each request over oslo.messaging to the agent of the host that has the volume "
    "attached. Stops cleanly on SIGTERM. Options: --config-file FILE ([DEFAULT] "
    "transport_url, [api], [keystone_authtoken], [oslo_policy]; may be repeated), --debug, "
    "--log-file FILE, and --ready-line: print 'READY <port>' on stdout once serving "
    "(console logs then go to stderr)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsnap-api", add_help=False)
    parser.add_argument("--ready-line", action="store_true")
    ns, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(rest):
        print(DESCRIPTION + "\n")
    return serve(rest, ready_line=ns.ready_line)


if __name__ == "__main__":
    raise SystemExit(main())
