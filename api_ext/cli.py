"""``qsnap``: the admin CLI over the native API. Not built yet."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qsnap",
        description="qsnap admin CLI: snapshot, delete and back up instances' volumes. "
        "Not implemented yet (api_ext issue); this entry point only prints help.",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0
