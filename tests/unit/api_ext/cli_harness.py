"""The ``qsnap`` CLI against the real ApiApp over real HTTP (keystoneauth1 session ->
cheroot -> noauth -> fake agents): a server on a free port and the CLI run in-process."""

from __future__ import annotations

import io
import threading
from typing import Any

from cheroot import wsgi

from api_ext import cli
from tests.unit.api_ext.fakes import INST, VOL, VOL2, FakeAgent, wrapped_app


class Server:
    """``host-a`` holds VOL and ``host-b`` VOL2, both of instance INST; ``roles`` under noauth."""

    def __init__(self, agents: dict[str, FakeAgent], roles: list[str], tmp: Any) -> None:
        routes = {"host-a": (VOL, INST), "host-b": (VOL2, INST)}
        app = wrapped_app(agents.__getitem__, tmp, routes, roles=roles)
        self._server = wsgi.Server(("127.0.0.1", 0), app, numthreads=4)
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.bind_addr[1]}"

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(timeout=10)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(server: Server | str, *args: str, tty: bool = False) -> tuple[int, str, str]:
    """``qsnap --os-auth-type none --os-endpoint URL ARGS``: exit code, stdout, stderr."""
    url = server if isinstance(server, str) else server.url
    out, err = io.StringIO(), Tty() if tty else io.StringIO()
    argv = ["--os-auth-type", "none", "--os-endpoint", url, *args]
    rc = cli.main(argv, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()
