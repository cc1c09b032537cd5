"""Bench P7: agent RPC round trip over RabbitMQ vs a raw oslo.messaging call, same run.

A private RabbitMQ node (testbed.rabbit.RabbitNode) and one server process holding two RPC
servers on the same transport: the agent's real endpoint (AgentEndpoint: wire validation,
typed service call, result serialisation) on topic qsnap-agent, and a raw no-op endpoint on
another topic. The client (this process) alternates the two calls, so noise hits both
alike; it prints both medians and the ratio. Target: agent ``get_operation`` median <= 5 ms.

Run: ``PYTHONPATH=. .venv/bin/python bench/rpc_roundtrip.py [--calls 1000]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from hostagent.config import make_conf
from hostagent.rpc.client import AgentAPI, get_transport

HOST = "bench-host"
RAW_TOPIC = "bench-raw"
CTXT = {"request_id": "req-bench"}
VOL = "11111111-1111-4111-8111-111111111111"
SNAP = "55555555-5555-4555-8555-555555555555"


class NoOp:
    def ping(self, ctxt: dict[str, Any]) -> None:
        return None


def serve(url: str) -> int:
    """Child: both servers on one transport until stdin closes."""
    from hostagent.rpc.messaging import messaging
    from hostagent.rpc.server import get_server
    from testbed.stub_agent import StubService

    om = messaging()
    conf = make_conf()
    transport = om.get_rpc_transport(conf, url=url)
    agent = get_server(transport, HOST, StubService(HOST))
    raw = om.get_rpc_server(
        transport, om.Target(topic=RAW_TOPIC, server=HOST), [NoOp()], executor="threading"
    )
    agent.start()
    raw.start()
    print("READY", flush=True)
    sys.stdin.read()
    for server in (agent, raw):
        server.stop()
        server.wait()
    transport.cleanup()
    return 0


def measure(url: str, calls: int, warmup: int) -> None:
    from hostagent.rpc.messaging import messaging

    om = messaging()
    conf = make_conf()
    transport = get_transport(conf, url)
    api = AgentAPI(transport, HOST, timeout=30)
    raw = om.get_rpc_client(transport, om.Target(topic=RAW_TOPIC), timeout=30)
    raw_ctx = raw.prepare(server=HOST)
    op = api.create_assisted_snapshot(
        CTXT, VOL, {"snapshot_id": SNAP, "type": "qcow2", "new_file": f"volume-{VOL}.{SNAP}"}
    )
    agent_t: list[float] = []
    raw_t: list[float] = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        got = api.get_operation(CTXT, op.id)
        t1 = time.perf_counter()
        raw_ctx.call({}, "ping")
        t2 = time.perf_counter()
        assert got == op
        if i >= warmup:
            agent_t.append(t1 - t0)
            raw_t.append(t2 - t1)
    transport.cleanup()

    def ms(xs: list[float], q: float) -> float:
        return sorted(xs)[int(q * (len(xs) - 1))] * 1000

    a, r = statistics.median(agent_t) * 1000, statistics.median(raw_t) * 1000
    print(f"calls per kind: {calls} (after {warmup} warm-up), alternating")
    print(f"raw oslo.messaging no-op call: median {r:.3f} ms, p90 {ms(raw_t, 0.9):.3f} ms")
    print(f"agent get_operation:           median {a:.3f} ms, p90 {ms(agent_t, 0.9):.3f} ms")
    print(f"ratio agent/raw: {a / r:.2f}x; overhead {a - r:.3f} ms")
    print(f"P7 target (agent median <= 5 ms): {'met' if a <= 5.0 else 'NOT met'} in this run")
    # The raw call measured 1.1-1.4 ms on an idle box (testbed.md); a loaded box slows both.
    print(
        f"at the idle-box raw anchor 1.1-1.4 ms this ratio gives {1.1 * a / r:.2f}-"
        f"{1.4 * a / r:.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    from testbed.rabbit import RabbitNode

    with RabbitNode() as node:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", node.transport_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        if line.strip() != "READY":
            child.kill()
            raise SystemExit(f"server process failed: {line!r}")
        try:
            measure(node.transport_url, args.calls, args.warmup)
        finally:
            child.stdin.close()
            child.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
