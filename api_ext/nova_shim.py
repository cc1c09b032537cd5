"""Install qsnap's compute driver where Nova can load it: ``nova/virt/qsnap.py``.

Nova imports ``'nova.virt.%s' % compute_driver``, so an out-of-tree driver needs a module
inside the ``nova.virt`` package (nova-powervm and nova-dpm shipped theirs the same way). This
writes a one-line module re-exporting :class:`api_ext.nova_driver.QsnapLibvirtDriver`; nova.conf
then says ``[DEFAULT] compute_driver = qsnap.QsnapLibvirtDriver``.

Usage, with the Python that runs nova-compute (qsnap importable by it)::

    python -m api_ext.nova_shim install          # write it (atomic, idempotent)
    python -m api_ext.nova_shim install --check  # exit 1 when missing or different

Nova is located with :func:`importlib.util.find_spec`, never imported here (its package
``__init__`` only); re-check after upgrading Nova.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

MODULE_NAME = "qsnap.py"
SHIM = (
    "# Written by qsnap (python -m api_ext.nova_shim install): Nova loads compute drivers from\n"
    "# nova.virt only, so nova.conf's [DEFAULT] compute_driver = qsnap.QsnapLibvirtDriver\n"
    "# finds qsnap's driver here. Do not edit: re-run the install instead.\n"
    "from api_ext.nova_driver import QsnapLibvirtDriver  # noqa: F401\n"
)


class ShimError(Exception):
    """Nova cannot be found, or the shim cannot be written."""


def nova_virt_dir() -> Path:
    """The directory of the installed ``nova.virt`` package of this Python."""
    try:
        spec = importlib.util.find_spec("nova.virt")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ShimError(f"nova is not installed for {sys.executable}: run this with nova's Python")
    return Path(next(iter(spec.submodule_search_locations)))


def problem(virt_dir: Path) -> str | None:
    """Why the shim in ``virt_dir`` is not the one this qsnap writes, or None when it is."""
    path = virt_dir / MODULE_NAME
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path} is unreadable: {exc}"
    return None if current == SHIM else f"{path} differs from qsnap's shim"


def install(virt_dir: Path) -> bool:
    """Write the shim into ``virt_dir``; False when it was already there, unchanged."""
    if problem(virt_dir) is None:
        return False
    _write_atomic(virt_dir / MODULE_NAME, SHIM)
    return True


def _write_atomic(path: Path, text: str) -> None:
    """Readers (a starting nova-compute) see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # whatever root's umask: nova-compute's user reads it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ShimError(f"cannot write {path}: {exc}") from exc
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api_ext.nova_shim", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="write nova/virt/qsnap.py")
    inst.add_argument("--check", action="store_true", help="only check; exit 1 if not current")
    inst.add_argument("--virt-dir", type=Path, help="nova.virt's directory (default: found)")
    args = parser.parse_args(argv)
    try:
        virt_dir = args.virt_dir or nova_virt_dir()
        if args.check:
            if (why := problem(virt_dir)) is not None:
                print(f"qsnap shim: {why}", file=sys.stderr)
                return 1
            print(f"qsnap shim: {virt_dir / MODULE_NAME} is current")
            return 0
        written = install(virt_dir)
    except ShimError as exc:
        print(f"qsnap shim: {exc}", file=sys.stderr)
        return 1
    state = "written" if written else "already current"
    print(f"qsnap shim: {virt_dir / MODULE_NAME} {state}")
    print("nova.conf: [DEFAULT] compute_driver = qsnap.QsnapLibvirtDriver")
    return 0


if __name__ == "__main__":
    sys.exit(main())
