"""``python -m tests.functional.hostagent.backup.runner URI DOMAIN VOLUME REPO JOURNAL ROOT``:
one online backup in its own process, slowed down in the read phase (``reading`` printed
first, after the checkpoint was taken and recorded) so the test can kill -9 it mid-read.
Test-side code: the product has no slow mode.
"""

from __future__ import annotations

import sys
import time

import libvirt_ops as lo
from hostagent.backup.online import BackupRequest
from tests.functional.hostagent.backup.local import LocalBackups


def main(argv: list[str]) -> int:
    uri, domain, volume, repo, journal_path, root = argv
    local = LocalBackups(lo.Connection(uri), journal_path, [root])
    said = False

    def progress(done: int, total: int) -> None:
        nonlocal said
        if not said:
            print("reading", flush=True)
            said = True
        time.sleep(1.0)

    try:
        local.backup(BackupRequest(domain, volume, repo, incremental=True), progress=progress)
    finally:
        local.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
