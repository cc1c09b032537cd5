"""``qsnap-agent``: the host agent daemon (oslo.messaging RPC server). Not built yet."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsnap-agent",
        description="qsnap host agent: receives snapshot, delete and backup requests over "
        "oslo.messaging and carries them out with libvirt and qemu-img. Not implemented yet "
        "(hostagent issue); this entry point only prints help.",
    )
    parser.add_argument("--config-file", help="oslo.config file (not read yet)")
    parser.parse_args(argv)
    parser.print_help()
    return 0
