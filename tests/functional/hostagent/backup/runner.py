"""``python -m tests.functional.hostagent.backup.runner URI DOMAIN VOLUME REPO JOURNAL``:
one online backup in its own process, slowed down in the read phase (``reading`` printed
first) so the test can kill -9 it mid-backup. Test-side code: the product has no slow mode.
"""

from __future__ import annotations

import sys
import time

import libvirt_ops as lo
from hostagent.backup.online import BackupRequest, backup_volume
from hostagent.journal.store import Journal


def main(argv: list[str]) -> int:
    uri, domain, volume, repo, journal_path = argv
    conn = lo.Connection(uri)
    journal = Journal(journal_path)
    said = False

    def progress(done: int, total: int) -> None:
        nonlocal said
        if not said:
            print("reading", flush=True)
            said = True
        time.sleep(1.0)

    backup_volume(
        conn, journal, BackupRequest(domain, volume, repo, incremental=True), progress=progress
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
