"""A separate process that thaws the guest unless told in time that we already did.

Why a process and not a thread or a ``finally``: a guest left frozen hangs every writer in
it, and our process may be killed (OOM, SIGKILL, a crash in libvirt's C code) between the
freeze and the thaw. The watchdog is started and connected to libvirtd BEFORE the freeze,
in its own session (a signal to our process group does not reach it), and talks to us over
a pipe:

    child -> parent  ``ready``          connected, domain found
    parent -> child  ``arm SECONDS``    we are about to freeze; deadline = now + SECONDS
    child -> parent  ``armed``
    parent -> child  ``done``           we thawed ourselves: exit without touching the guest
    parent -> child  ``thaw`` or EOF    thaw now (EOF = our process died or gave up)

At the deadline it thaws on its own. Thaw is idempotent, so a race with our own thaw is
harmless. Run as ``python -m libvirt_ops._thaw_watchdog URI DOMAIN_UUID``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from typing import IO

from libvirt_ops.errors import Timeout

THAW_RETRY_S = 30.0


class ThawWatchdog:
    """Parent side: start, arm just before the freeze, ``done()`` after our own thaw."""

    def __init__(self, uri: str, domain_uuid: str, *, ready_timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "libvirt_ops._thaw_watchdog", uri, domain_uuid],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            text=True,
            bufsize=1,
        )
        self._expect("ready", ready_timeout)

    def _expect(self, word: str, timeout: float) -> None:
        out = self.proc.stdout
        assert out is not None
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.kill()
                raise Timeout(f"thaw watchdog did not say {word!r} within {timeout:.1f} s")
        line = out.readline().strip()
        if line != word:
            self.kill()
            raise Timeout(f"thaw watchdog said {line!r} instead of {word!r}")

    def _send(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def arm(self, seconds: float, *, ack_timeout: float = 5.0) -> float:
        """Start the countdown; returns OUR monotonic deadline (never later than the child's)."""
        deadline = time.monotonic() + seconds
        self._send(f"arm {seconds:.3f}")
        self._expect("armed", ack_timeout)
        return deadline

    def done(self, timeout: float = 5.0) -> None:
        """We thawed: let the watchdog exit without touching the guest."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._send("done")
        self._finish(timeout)

    def thaw_now(self, timeout: float = THAW_RETRY_S + 5) -> str:
        """Ask the watchdog to thaw (our own thaw failed); returns its last word."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._send("thaw")
        return self._finish(timeout)

    def _finish(self, timeout: float) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "still running"
        lines = (out or "").split()
        return lines[-1] if lines else ""

    def kill(self) -> None:
        """Only for a watchdog that never got armed (nothing frozen yet)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


# --- child side ------------------------------------------------------------------------


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def _thaw(uri: str, domain_uuid: str) -> int:
    import libvirt  # late import: the parent side must stay cheap to import

    stop = time.monotonic() + THAW_RETRY_S
    last = ""
    while time.monotonic() < stop:
        try:
            conn = libvirt.open(uri)
            n = conn.lookupByUUIDString(domain_uuid).fsThaw(None, 0)
            _say(f"thawed {n}")
            return 0
        except libvirt.libvirtError as exc:
            last = str(exc)
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                _say("gone")
                return 0
            time.sleep(0.5)
    _say(f"thaw-failed {last!r}")
    return 1


def _read_line(stream: IO[str], deadline: float | None) -> str | None:
    """A line, "" on EOF, None at the deadline."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not sel.select(wait):
            return None
    return os.read(stream.fileno(), 4096).decode(errors="replace") or ""


def main(argv: list[str]) -> int:
    import libvirt

    uri, domain_uuid = argv
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        libvirt.open(uri).lookupByUUIDString(domain_uuid)
    except libvirt.libvirtError as exc:
        _say(f"error {exc}")
        return 2
    _say("ready")
    deadline: float | None = None
    buf = ""
    while True:
        chunk = _read_line(sys.stdin, deadline)
        if chunk is None or chunk == "":  # deadline, or our parent went away
            return _thaw(uri, domain_uuid)
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            word, _, arg = line.strip().partition(" ")
            if word == "arm":
                deadline = time.monotonic() + float(arg)
                _say("armed")
            elif word == "done":
                _say("disarmed")
                return 0
            elif word == "thaw":
                return _thaw(uri, domain_uuid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
