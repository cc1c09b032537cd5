"""The libvirt host: virtlogd + libvirtd up, a ``qemu:///system`` connection.

There is no systemd here: daemons are started by hand. ``tools/host_setup.sh`` starts them
for a whole session; this class only makes sure they answer, and can restart libvirtd (a
running domain survives that) for tests of reconnect logic.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from libvirt_ops import Connection
from testbed import procs

URI = "qemu:///system"


def _pid_of(name: str) -> int | None:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def _answers() -> bool:
    return subprocess.run(["virsh", "-q", "-c", URI, "uri"], capture_output=True).returncode == 0


class LibvirtHost:
    """Daemons up and a reconnecting connection; ``restart_daemon()`` bounces libvirtd."""

    def __init__(self) -> None:
        self.uri = URI
        self.ensure_daemons()
        self.connection = Connection(URI)

    @staticmethod
    def ensure_daemons(timeout: float = 60.0) -> None:
        if _pid_of("virtlogd") is None:
            subprocess.run(["virtlogd", "-d"], check=True)
        if _pid_of("libvirtd") is None:
            subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + timeout
        while not _answers():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd does not answer on " + URI)
            time.sleep(0.1)

    def restart_daemon(self, timeout: float = 60.0) -> None:
        """Kill libvirtd by pid and start it again; domains keep running in QEMU."""
        pid = _pid_of("libvirtd")
        if pid is not None:
            procs.stop(pid, timeout=20)
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + timeout
        while not _answers():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not come back")
            time.sleep(0.1)

    def close(self) -> None:
        self.connection.close()

    @staticmethod
    def qemu_log(domain_name: str) -> str:
        p = Path("/var/log/libvirt/qemu") / f"{domain_name}.log"
        return p.read_text(errors="replace") if p.exists() else ""
