"""``qsnap-api``: the REST API service (Nova-compatible assisted snapshots, /v1). Not built yet."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsnap-api",
        description="qsnap REST API: Nova-compatible os-assisted-volume-snapshots and the "
        "native /v1 API. Not implemented yet (api_ext issue); this entry point only prints help.",
    )
    parser.add_argument("--config-file", help="oslo.config file (not read yet)")
    parser.parse_args(argv)
    parser.print_help()
    return 0
