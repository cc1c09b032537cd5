"""The safety policy: inspect every file of a chain before anything else touches it.

Two independent opinions must both pass: oslo.utils' format inspector (every named safety
check runs and reports, as in Glance/Nova/Cinder after CVE-2024-32498) and our own header
parser with stricter bounds and the naming/location policy. Formats are never probed: the
caller pins the top format and each backing format must be recorded in its parent.

Location: every layer's realpath must lie under an allowed root AND in the top's own
directory (the share directory, with symlinked directories such as a mount point resolved).
Backing names are plain basenames, so only a symlinked file can lead a chain elsewhere: into
another share (another allowed root) or another directory of the same one. That is refused
(rule ``cross-directory``), for the top as for every backing file.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

from oslo_utils.imageutils import format_inspector as fi

from qcow2._chain import Chain, LayerInfo
from qcow2._header import (
    INCOMPAT_EXTL2,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    Header,
    parse_header,
)
from qcow2._layer import L1_OFFSET_MASK, Layer, Qcow2Layer, RawLayer
from qcow2.errors import Qcow2Error, UnsafeImage
from qcow2.naming import CINDER, Naming

FORMATS = ("qcow2", "raw")
#: Incompatible feature bits oslo.utils (as of 10.x) knows; extended L2 (bit 4) is newer,
#: so its ``unknown_features`` verdict is overruled only when our parser saw exactly that bit.
_OSLO_KNOWN_INCOMPAT = 0x0F
#: ``backing_file`` fails for every overlay: our own backing policy below replaces it.
_REPLACED_CHECKS = frozenset({"backing_file"})
#: Checks judged after our own header parse (see :func:`_oslo_verdict`).
_DEFERRED_CHECKS = frozenset({"unknown_features", "data_file"})
_L1_RESERVED = ~L1_OFFSET_MASK & ~(1 << 63) & 0xFFFFFFFFFFFFFFFF


class _DropReplacedWarnings(logging.Filter):
    """oslo logs a WARNING per overlay for the check we replace; keep the log readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and args and args[0] in _REPLACED_CHECKS)


logging.getLogger(fi.__name__).addFilter(_DropReplacedWarnings())


def open_chain(
    path: str | os.PathLike[str],
    *,
    roots: Sequence[str | os.PathLike[str]],
    naming: Naming = CINDER,
    fmt: str = "qcow2",
    max_depth: int = 128,
) -> Chain:
    """Inspect the chain under ``path`` and return it ready for reading."""
    return inspect_chain(path, roots=roots, naming=naming, fmt=fmt, max_depth=max_depth)


def inspect_chain(
    path: str | os.PathLike[str],
    *,
    roots: Sequence[str | os.PathLike[str]],
    naming: Naming = CINDER,
    fmt: str = "qcow2",
    max_depth: int = 128,
) -> Chain:
    """Walk and check the whole chain; raise :class:`UnsafeImage` on the first violation.

    ``fmt`` is the caller's pinned format of ``path``; it is never probed from content.
    """
    top = os.path.abspath(os.fspath(path))
    if ".." in os.fspath(path).split(os.sep):
        raise UnsafeImage(top, "dotdot", "path contains '..'")
    real_roots = [os.path.realpath(os.fspath(r)) for r in roots]
    if not real_roots:
        raise UnsafeImage(top, "roots", "no allowed roots given")
    share_dir = os.path.realpath(os.path.dirname(top))
    infos: list[LayerInfo] = []
    readers: list[Layer] = []
    seen: set[tuple[int, int]] = set()
    cur, cur_fmt = top, fmt
    while True:
        if len(readers) >= max_depth:
            raise UnsafeImage(cur, "depth", f"chain deeper than {max_depth} layers")
        if cur_fmt not in FORMATS:
            raise UnsafeImage(cur, "format", f"format {cur_fmt!r} not allowed")
        info, reader, ident = _inspect_one(cur, cur_fmt, real_roots, share_dir)
        if ident in seen:
            raise UnsafeImage(cur, "loop", "backing chain loops back to this file")
        seen.add(ident)
        infos.append(info)
        readers.append(reader)
        if info.backing_name is None:
            break
        _check_backing_name(cur, info.backing_name, info.backing_fmt, naming)
        assert info.backing_fmt is not None
        cur, cur_fmt = os.path.join(os.path.dirname(cur), info.backing_name), info.backing_fmt
    return Chain(tuple(infos), readers)


def _inspect_one(
    path: str, fmt: str, roots: list[str], share_dir: str
) -> tuple[LayerInfo, Layer, tuple[int, int]]:
    real = _check_location(path, roots, share_dir)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UnsafeImage(path, "unreadable", str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeImage(path, "not-regular", "not a regular file")
        ident = (st.st_dev, st.st_ino)
        size = st.st_size
        head = os.pread(fd, 512, 0)
        if fmt == "qcow2" and len(head) >= 24:
            cb = int.from_bytes(head[20:24], "big")
            if MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS and len(head) == 512:
                head += os.pread(fd, (1 << cb) - 512, 512)
    finally:
        os.close(fd)
    failures = _oslo_failures(path, fmt, head)
    _oslo_check(path, failures)
    if fmt == "raw":
        info = LayerInfo(real, "raw", size, size, None, None, None, None)
        return info, RawLayer(real, ident, size), ident
    header = parse_header(path, head, size)
    _oslo_verdict(path, failures, header)
    reader = Qcow2Layer(real, ident, header, size)
    _check_l1(path, reader)
    info = LayerInfo(
        path=real,
        fmt="qcow2",
        virtual_size=header.size,
        file_size=size,
        backing_name=header.backing_name,
        backing_fmt=header.backing_fmt,
        cluster_size=header.cluster_size,
        version=header.version,
    )
    return info, reader, ident


def _check_location(path: str, roots: list[str], share_dir: str) -> str:
    """The file must exist and its realpath (symlinks resolved) lie inside one root and
    directly in ``share_dir`` (the top's directory, resolved)."""
    try:
        lst = os.lstat(path)
    except OSError as exc:
        raise UnsafeImage(path, "missing", str(exc)) from None
    real = os.path.realpath(path)
    if not any(real != root and os.path.commonpath([real, root]) == root for root in roots):
        if stat.S_ISLNK(lst.st_mode) or real != os.path.abspath(path):
            raise UnsafeImage(path, "symlink-escape", f"resolves to {real}, outside the roots")
        raise UnsafeImage(path, "outside-roots", f"{real} is not under any allowed root")
    if os.path.dirname(real) != share_dir:
        raise UnsafeImage(
            path,
            "cross-directory",
            f"resolves to {real}, outside the chain's share directory {share_dir}",
        )
    return real


def _oslo_failures(path: str, fmt: str, head: bytes) -> dict[str, str]:
    """Run oslo.utils' inspector for ``fmt`` on the bytes we read; all checks report."""
    cls = fi.get_inspector(fmt)
    if cls is None:
        raise UnsafeImage(path, "format", f"no inspector for {fmt}")
    insp = cls()
    try:
        insp.eat_chunk(head)
        insp.finish()
        if not insp.complete or not insp.format_match:
            raise UnsafeImage(path, "format", f"content is not {fmt}")
        insp.safety_check()
    except fi.SafetyCheckFailed as exc:
        return {name: str(err) for name, err in exc.failures.items()}
    except fi.ImageFormatError as exc:
        raise UnsafeImage(path, "format", str(exc)) from None
    return {}


def _oslo_check(path: str, failures: dict[str, str]) -> None:
    for name, msg in failures.items():
        if name not in _REPLACED_CHECKS and name not in _DEFERRED_CHECKS:
            raise UnsafeImage(path, name.replace("_", "-"), f"format inspector: {msg}")


def _oslo_verdict(path: str, failures: dict[str, str], header: Header) -> None:
    """Overrule two known false positives of oslo.utils 10.x, nothing else.

    ``unknown_features`` stands unless the only bit oslo does not know is extended L2.
    ``data_file`` stands unless the image is v2: v2 has no feature field, oslo reads the
    first extension's length there (a ``qcow2`` backing format sets "bit 2"). Our parser has
    already rejected any data-file extension or bit, so nothing is lost.
    """
    if "data_file" in failures and header.version != 2:
        raise UnsafeImage(path, "data-file", f"format inspector: {failures['data_file']}")
    if "unknown_features" in failures:
        beyond = header.incompatible & ~_OSLO_KNOWN_INCOMPAT
        if beyond & ~INCOMPAT_EXTL2 or not beyond:
            raise UnsafeImage(
                path, "unknown-features", f"format inspector: {failures['unknown_features']}"
            )


def _check_l1(path: str, layer: Qcow2Layer) -> None:
    """Every L2 table the L1 points at must be aligned and inside the file."""
    cs = layer.header.cluster_size
    try:
        l1 = layer.l1()
    except (OSError, Qcow2Error) as exc:
        raise UnsafeImage(path, "l1-table", f"cannot read L1: {exc}") from None
    finally:
        layer.close()
    for i, e in enumerate(l1):
        off = e & L1_OFFSET_MASK
        if e & _L1_RESERVED or off % cs or (off and off + cs > layer.file_size):
            raise UnsafeImage(path, "l1-table", f"L1[{i}] = {e:#x} invalid")


def _check_backing_name(path: str, name: str, backing_fmt: str | None, naming: Naming) -> None:
    if name.startswith("json:"):
        raise UnsafeImage(path, "json-backing", f"backing {name[:64]!r} is a json: spec")
    if name.startswith("/"):
        raise UnsafeImage(path, "absolute-backing", f"backing {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise UnsafeImage(path, "dotdot", f"backing {name!r} contains '..'")
    if ":" in name:
        raise UnsafeImage(path, "protocol-backing", f"backing {name!r} names a protocol")
    if "/" in name:
        raise UnsafeImage(path, "backing-path", f"backing {name!r} is not a plain basename")
    if not naming.is_image_name(name):
        raise UnsafeImage(path, "backing-name", f"backing {name!r} breaks the naming rule")
    if backing_fmt is None:
        raise UnsafeImage(path, "backing-format", "backing format not recorded in the image")
    if backing_fmt not in FORMATS:
        raise UnsafeImage(path, "backing-format", f"backing format {backing_fmt!r} not allowed")
