"""``qsnap-agent``: the host agent daemon (oslo.messaging RPC server on topic qsnap-agent).

Only ``--ready-line`` is ours; every other argument goes to oslo.config, so the standard
``--config-file``/``--config-dir`` and oslo.log's ``--debug``/``--log-file``/``--log-dir``
work as in any OpenStack service. Without a config file the embedded defaults apply.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "qsnap host agent: receives snapshot create/delete requests over oslo.messaging, carries "
    "them out with libvirt (journaled, per-disk serialized) and reports the outcome to Cinder. "
    "Stops cleanly on SIGTERM. Options: --config-file FILE ([DEFAULT] transport_url/host/"
    "state_path, [libvirt], [agent], [shares], [cinder], [oslo_messaging_notifications]; may "
    "be repeated), --debug, --log-file FILE, and --ready-line: print READY on stdout once the "
    "RPC server consumes (for supervisors/tests; console logs then go to stderr)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsnap-agent", add_help=False)
    parser.add_argument("--ready-line", action="store_true")
    ns, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(rest):
        print(DESCRIPTION + "\n")
    from hostagent import agent  # heavy imports only when really starting

    ready = (lambda: print("READY", flush=True)) if ns.ready_line else None
    return agent.main(rest, ready=ready)


if __name__ == "__main__":
    raise SystemExit(main())
