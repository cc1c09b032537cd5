"""The Cinder ledger ``volume-<uuid>.info``: which file is active, which file each snapshot made.

Byte-compatible with Cinder's remotefs driver, which reads and writes it with
``json.dump(snap_info, f, indent=1, sort_keys=True)`` (no trailing newline). Cinder writes
it in place, so a crash can leave it empty; we write a temp file, fsync, rename, fsync the
directory, so ours never can. Every name read is validated before anyone uses it as a path.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field

from qcow2.errors import LedgerError
from qcow2.naming import CINDER, Naming, is_uuid, ledger_name, volume_base_name

ACTIVE = "active"
#: A ledger is a handful of names; anything bigger is not a ledger.
_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Ledger:
    """``active`` file name and ``snapshots`` (snapshot id -> file created when it was taken)."""

    active: str
    snapshots: dict[str, str] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, str]:
        """The dict Cinder keeps (``active`` beside the snapshot ids)."""
        return {ACTIVE: self.active, **self.snapshots}


def ledger_path(volume_dir: str, volume_id: str) -> str:
    """Path of the ledger of ``volume_id`` in ``volume_dir``."""
    if not is_uuid(volume_id):
        raise LedgerError(f"{volume_id!r} is not a volume id")
    return os.path.join(volume_dir, ledger_name(volume_id))


def _check_name(path: str, volume_id: str, key: str, name: object, naming: Naming) -> str:
    """A ledger value must be a plain image name belonging to this volume."""
    base = volume_base_name(volume_id)
    if (
        not isinstance(name, str)
        or not naming.is_image_name(name)
        or not (name == base or name.startswith(base + "."))
    ):
        raise LedgerError(f"{path}: entry {key!r} names {name!r}, not a file of this volume")
    return name


def parse_ledger(path: str, text: str, volume_id: str, *, naming: Naming = CINDER) -> Ledger:
    """Validate ledger ``text`` read from ``path``; every problem names the file."""
    if not text.strip():
        raise LedgerError(f"{path}: ledger is empty (a crash during Cinder's in-place write?)")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise LedgerError(f"{path}: ledger is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}: ledger is not a JSON object")
    if ACTIVE not in raw:
        raise LedgerError(f"{path}: ledger has no 'active' entry")
    active = _check_name(path, volume_id, ACTIVE, raw[ACTIVE], naming)
    snapshots: dict[str, str] = {}
    for key, value in raw.items():
        if key == ACTIVE:
            continue
        if not is_uuid(key):
            raise LedgerError(f"{path}: key {key!r} is not a snapshot id")
        snapshots[key] = _check_name(path, volume_id, key, value, naming)
    return Ledger(active=active, snapshots=snapshots)


def read_ledger(
    volume_dir: str,
    volume_id: str,
    *,
    naming: Naming = CINDER,
    empty_as_missing: bool = False,
) -> Ledger | None:
    """The ledger of ``volume_id``, or None when there is none (Cinder: no snapshots).

    An empty file raises :class:`LedgerError` unless ``empty_as_missing``: after a crash
    Cinder cannot tell "no snapshots" from "lost ledger", so guessing is the caller's call.
    """
    path = ledger_path(volume_dir, volume_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"{path}: cannot open ledger: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise LedgerError(f"{path}: ledger larger than {_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LedgerError(f"{path}: ledger is not UTF-8") from exc
    if not text.strip() and empty_as_missing:
        return None
    return parse_ledger(path, text, volume_id, naming=naming)


def dump_ledger(ledger: Ledger) -> bytes:
    """The exact bytes Cinder's ``_write_info_file`` produces for the same content."""
    return json.dumps(ledger.to_json_dict(), indent=1, sort_keys=True).encode("utf-8")


def write_ledger(
    volume_dir: str,
    volume_id: str,
    ledger: Ledger,
    *,
    naming: Naming = CINDER,
    mode: int = 0o660,
) -> None:
    """Replace the ledger atomically and durably.

    Temp file in the same directory (rename is atomic only within one filesystem), fsync,
    rename over the old one, fsync the directory. An existing ledger's mode and owner are
    kept, since Cinder (possibly running as another user) must still read and write it.
    """
    path = ledger_path(volume_dir, volume_id)
    # Refuse to write what we would refuse to read.
    parse_ledger(path, dump_ledger(ledger).decode(), volume_id, naming=naming)
    try:
        st: os.stat_result | None = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    tmp = os.path.join(volume_dir, f".{ledger_name(volume_id)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.write(fd, dump_ledger(ledger))
            if st is not None:
                os.fchmod(fd, st.st_mode & 0o7777)
                if os.geteuid() == 0:
                    os.fchown(fd, st.st_uid, st.st_gid)
            else:
                os.fchmod(fd, mode)  # not subject to umask, like Cinder's explicit chmod
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
