"""A private MariaDB server for the Nova peer: own datadir, socket and port under the run dir.

Why not sqlite: under Nova's conductor it gave "database is locked" and boots that never went
ACTIVE. Why not the system server: nothing here may depend on, or disturb, a daemon the bed did
not start. The server runs as root with a passwordless root account reachable only on
127.0.0.1 and its private socket; it is durable enough for a test (no binlog, lazy log flush)
and stopped by pid.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

from testbed import procs
from testbed.rabbit import free_port

_TUNING = (
    "--innodb-log-file-size=16M",
    "--innodb-buffer-pool-size=64M",
)


class MariaDB:
    """``url(db)`` gives an SQLAlchemy URL once the constructor returned."""

    def __init__(self, base: Path | None = None, timeout: float = 60.0) -> None:
        self.base = base or procs.run_dir() / f"mariadb-{uuid.uuid4().hex[:6]}"
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.datadir = self.base / "data"
        self.socket = self.base / "mysqld.sock"
        self.log = self.base / "error.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        init = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db", *_TUNING],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {init.stdout[-1500:]}{init.stderr}")
        out = open(self.base / "mariadbd.out", "wb")
        self._proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root",
             f"--pid-file={self.base / 'mariadbd.pid'}", f"--log-error={self.log}",
             "--skip-log-bin", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0",
             "--innodb-doublewrite=0", "--max-connections=1000",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
             *_TUNING],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        out.close()
        procs.record("mariadbd", self._proc.pid)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited rc={self._proc.returncode}: {self.tail()}")
            if self.socket.exists():
                res = self.sql("SELECT 1", check=False)
                if res.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"mariadbd not ready in {timeout}s: {self.tail()}")
            time.sleep(0.05)

    def url(self, db: str) -> str:
        """An SQLAlchemy URL for PyMySQL (TCP on loopback: Nova's services all take it)."""
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{db}?charset=utf8mb4"

    def create(self, *dbs: str) -> None:
        self.sql("".join(f"CREATE DATABASE IF NOT EXISTS `{d}`;" for d in dbs))

    def sql(
        self, statement: str, db: str | None = None, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run SQL with the ``mariadb`` client: tab-separated rows, no header, raw values."""
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "--batch",
                "--raw", "--skip-column-names", "-e", statement]  # fmt: skip
        if db:
            argv.append(db)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"SQL failed ({statement[:200]}): {res.stderr.strip()}")
        return res

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no error log)"

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                procs.stop(self._proc.pid, timeout=20, group=True)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            procs.forget("mariadbd", self._proc.pid)
            self._proc = None
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> MariaDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
