"""One exception hierarchy for the format layer.

Every error names the file and the rule it broke, so an operator can act on the message
without reading code.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base of every error raised by :mod:`qcow2`."""


class UnsafeImage(Qcow2Error):
    """An image (or one of its backing files) breaks the safety policy.

    Raised before any tool touches the file. ``path`` is the offending file, ``rule`` a
    short machine-readable name of the broken rule (e.g. ``data-file``, ``backing-name``).
    """

    def __init__(self, path: str, rule: str, detail: str) -> None:
        self.path = path
        self.rule = rule
        self.detail = detail
        super().__init__(f"{path}: unsafe image ({rule}): {detail}")


class CorruptImage(Qcow2Error):
    """An image passed inspection but its data structures are inconsistent on read."""


class LedgerError(Qcow2Error):
    """The Cinder ``volume-<uuid>.info`` ledger is missing, unreadable or inconsistent."""


class QemuImgError(Qcow2Error):
    """A qemu-img invocation failed; carries the command line and its stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} failed ({returncode}): {stderr.strip()}")


class ImageExists(Qcow2Error):
    """A file that must be created exclusively already exists (never overwritten)."""


class SnapshotNotFound(Qcow2Error):
    """The ledger has no entry for the snapshot (Cinder treats this as already deleted)."""


class SnapshotExists(Qcow2Error):
    """The ledger already maps the snapshot id to a file other than a finished create."""
