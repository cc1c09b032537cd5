"""What the ``qsnap`` CLI prints: tables or the API's JSON on stdout, progress on stderr.

Progress goes to stderr so ``--format json`` output stays parseable while waiting. On a
terminal it is one redrawn bar; otherwise (logs, CI, pipes) plain lines, written when the
state or step changes, when progress moved, at most every ``min_gap`` seconds, and at least
every ``heartbeat`` seconds so a long merge still shows it is alive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

FINAL_STATES = ("succeeded", "failed", "cancelled")
_BAR_WIDTH = 30


def print_json(body: object, out: TextIO) -> None:
    out.write(json.dumps(body, indent=2, sort_keys=True) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [list(headers), ["-" * w for w in widths], *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def progress_of(op: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """``(percent or None, current step name or None)`` of a wire operation."""
    result = op.get("result") or {}
    prog = result.get("progress") or {}
    cur, end = prog.get("cur"), prog.get("end")
    pct = None
    if isinstance(cur, int) and isinstance(end, int) and end > 0:
        pct = max(0, min(100, cur * 100 // end))
    steps = [s for s in result.get("steps") or () if isinstance(s, Mapping)]
    current = next((s for s in reversed(steps) if s.get("state") == "planned"), None)
    step = current or (steps[-1] if steps else None)
    return pct, (str(step.get("name")) if step else None)


def _progress_cell(op: Mapping[str, Any]) -> str:
    pct, step = progress_of(op)
    parts = [f"{pct}%" if pct is not None else "", step or ""]
    return " ".join(p for p in parts if p)


def print_operations(body: Mapping[str, Any], out: TextIO, err: TextIO) -> None:
    ops = body.get("operations") or []
    rows = [
        [
            str(op["id"]),
            str(op["kind"]),
            str(op["state"]),
            str(op["host"]),
            ",".join(op.get("volume_ids") or ()),
            str(op.get("created_at") or ""),
            _progress_cell(op),
        ]
        for op in ops
    ]
    table(["ID", "KIND", "STATE", "HOST", "VOLUMES", "CREATED", "PROGRESS"], rows, out)
    for host, reason in sorted((body.get("failed_hosts") or {}).items()):
        err.write(f"warning: host {host} not listed: {reason}\n")


def operation_rows(op: Mapping[str, Any]) -> list[list[str]]:
    rows = [
        ["id", str(op["id"])],
        ["kind", str(op["kind"])],
        ["state", str(op["state"])],
        ["host", str(op["host"])],
        ["volumes", ", ".join(op.get("volume_ids") or ()) or "-"],
    ]
    for key in ("snapshot_id", "instance_uuid", "created_at", "updated_at"):
        if op.get(key):
            rows.append([key, str(op[key])])
    result = dict(op.get("result") or {})
    pct, _ = progress_of(op)
    prog = result.pop("progress", None) or {}
    if prog.get("end"):
        rows.append(["progress", f"{prog.get('cur')}/{prog.get('end')} ({pct}%)"])
    steps = result.pop("steps", None) or []
    if steps:
        rows.append(["steps", ", ".join(f"{s.get('name')}:{s.get('state')}" for s in steps)])
    for snap in result.pop("snapshots", None) or []:
        rows.append(["snapshot", f"{snap.get('snapshot_id')} of volume {snap.get('volume_id')}"])
    for bk in result.pop("backups", None) or []:
        rows.append(["backup", backup_line(bk)])
    for key, value in sorted(result.items()):
        if value is not None:
            rows.append([f"result.{key}", json.dumps(value, sort_keys=True)])
    error = op.get("error")
    if error:
        rows.append(["error", f"{error.get('code')}: {error.get('message')}"])
    return rows


def human_bytes(value: object) -> str:
    """``1.5 GiB`` for humans (tables only; JSON keeps the exact integers)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "" if value is None else str(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{value} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def backup_line(bk: Mapping[str, Any]) -> str:
    """One backup of a create operation's result: id, volume, type, bytes, fallback."""
    kind = "incremental" if bk.get("incremental") else "full"
    text = (
        f"{bk.get('backup_id')} of volume {bk.get('volume_id')} ({kind}, read "
        f"{human_bytes(bk.get('bytes_read'))}, stored {human_bytes(bk.get('bytes_stored'))})"
    )
    if bk.get("fallback_reason"):
        text += f"; full read because: {bk['fallback_reason']}"
    return text


def print_operation(body: Mapping[str, Any], out: TextIO) -> None:
    table(["FIELD", "VALUE"], operation_rows(body["operation"]), out)


class ProgressReporter:
    """Shows a waited operation's progress on ``stream`` (bar on a TTY, lines otherwise)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        min_gap: float = 2.0,
        heartbeat: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._min_gap = min_gap
        self._heartbeat = heartbeat
        self._clock = clock
        self._last: tuple[str, str | None, int | None] | None = None
        self._last_at = 0.0
        self._drawn = False

    def update(self, op: Mapping[str, Any]) -> None:
        pct, step = progress_of(op)
        state = str(op["state"])
        key = (state, step, pct)
        if self._tty:
            self._draw_bar(op, state, step, pct)
        else:
            now = self._clock()
            changed = self._last is None or key[:2] != self._last[:2]
            moved = self._last is not None and pct != self._last[2]
            if (
                changed
                or (moved and now - self._last_at >= self._min_gap)
                or now - self._last_at >= self._heartbeat
            ):
                pct_text = f", {pct}%" if pct is not None else ""
                step_text = f", step {step}" if step else ""
                self._stream.write(f"operation {op['id']}: {state}{step_text}{pct_text}\n")
                self._stream.flush()
                self._last_at = now
        self._last = key

    def _draw_bar(
        self, op: Mapping[str, Any], state: str, step: str | None, pct: int | None
    ) -> None:
        if state == "succeeded":
            pct = 100
        filled = (pct or 0) * _BAR_WIDTH // 100
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        pct_text = f"{pct:3d}%" if pct is not None else "  ?%"
        label = f"{state} {step}" if step else state
        self._stream.write(f"\r{str(op['id'])[:8]} [{bar}] {pct_text} {label}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def note(self, message: str) -> None:
        """A line that must not be overwritten by the bar (e.g. a transient poll error)."""
        self.close()
        self._stream.write(message + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
