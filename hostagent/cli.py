"""``qsnap-agent``: the host agent daemon (oslo.messaging RPC server on topic qsnap-agent)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsnap-agent",
        description="qsnap host agent: receives assisted snapshot create/delete requests over "
        "oslo.messaging, carries them out with libvirt (journaled, per-disk serialized) and "
        "reports the outcome to Cinder. Stops cleanly on SIGTERM.",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        required=True,
        metavar="FILE",
        help="oslo.config file ([DEFAULT] transport_url/host/state_path, [libvirt], "
        "[agent], [shares], [cinder]); may be repeated",
    )
    parser.add_argument(
        "--ready-line",
        action="store_true",
        help="print READY on stdout once the RPC server consumes (for supervisors/tests)",
    )
    ns = parser.parse_args(argv)
    from hostagent import agent  # heavy imports only when really starting

    ready = (lambda: print("READY", flush=True)) if ns.ready_line else None
    return agent.main(ns.config_file, ready=ready)


if __name__ == "__main__":
    raise SystemExit(main())
