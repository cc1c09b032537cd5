"""``qsnap-api``: the REST API service (Nova-compatible assisted snapshots, native /v1).

Stack: WebOb + Routes for the application (what Nova and Cinder use, so request parsing,
faults and routing behave as the peers expect) served by cheroot, a maintained, pure-Python,
thread-pooled HTTP/1.1 WSGI server (CherryPy's). oslo.service's wsgi server was not chosen:
it is eventlet-based, and this project runs oslo.messaging on the threading backend.
cheroot also bounds request bodies itself (``max_request_body_size``), in front of the app's
own 413. One process: HTTP threads + an oslo.messaging listener for the agents' inventory.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from api_ext import auth
from api_ext.app import AgentClient, ApiApp
from api_ext.config import make_conf
from api_ext.router import InventoryListener, Router
from hostagent.rpcapi import AgentAPI, get_transport

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


def serve(config_files: list[str], *, ready_line: bool = False) -> int:
    from cheroot import wsgi
    from oslo_log import log as oslo_log

    conf = make_conf(config_files=config_files)
    oslo_log.setup(conf, "qsnap-api")
    transport = get_transport(conf)
    agents = _Agents(transport, conf.api.rpc_timeout)
    probe_timeout = min(5.0, conf.api.rpc_timeout)
    router = Router(
        conf.api.hosts,
        probe=lambda host: AgentAPI(transport, host, timeout=probe_timeout).get_inventory({}),
    )
    listener = InventoryListener(transport, router)
    listener.start()
    app = ApiApp(router, agents, auth.make_enforcer(conf), max_body=conf.api.max_request_body_size)
    server = wsgi.Server(
        (conf.api.bind_host, conf.api.bind_port),
        auth.wrap(app, conf),
        numthreads=conf.api.threads,
        server_name="qsnap-api",
    )
    server.max_request_body_size = conf.api.max_request_body_size
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.prepare()
    thread = threading.Thread(target=server.serve, name="http", daemon=True)
    thread.start()
    host, port = server.bind_addr[:2]
    LOG.info("qsnap-api listening on %s:%s (auth %s)", host, port, conf.api.auth_strategy)
    if ready_line:
        print(f"READY {port}", flush=True)
    stop.wait()
    server.stop()
    thread.join(timeout=10)
    listener.stop()
    transport.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsnap-api",
        description="qsnap REST API: Nova-compatible os-assisted-volume-snapshots and the "
        "native /v1 API; routes each request over oslo.messaging to the agent of the host "
        "that has the volume attached. Stops cleanly on SIGTERM.",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        required=True,
        metavar="FILE",
        help="oslo.config file ([DEFAULT] transport_url, [api], [keystone_authtoken], "
        "[oslo_policy]); may be repeated",
    )
    parser.add_argument(
        "--ready-line",
        action="store_true",
        help="print 'READY <port>' on stdout once serving (for supervisors/tests)",
    )
    ns = parser.parse_args(argv)
    return serve(ns.config_file, ready_line=ns.ready_line)


if __name__ == "__main__":
    raise SystemExit(main())
