"""One real deployment per share kind: Cinder 29 (NfsDriver) -> qsnap-api -> RabbitMQ ->
qsnap-agent -> libvirt guest whose disk is the Cinder volume file.

Start order breaks the circular wiring: the API needs only RabbitMQ and the agent's host
name; Cinder needs the API's URL; the agent needs Cinder's URL and project.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.rpc.client import AgentAPI
from testbed import procs
from testbed.agent import AgentProcess, noauth_cinder
from testbed.cinder import REPO, CinderPeer, attached_guest
from testbed.guest import VolumeGuest
from testbed.service import start_api

CINDER_EXTENSION = "api_ext.cinder_extension.Qsnap_snapshot_metadata"


@dataclass
class Deployment:
    """The wired peers of one share kind and the attached volume under test."""

    share: Any
    cinder: CinderPeer
    api_url: str
    agent_host: str
    agent: AgentAPI
    guest: VolumeGuest
    volume_id: str
    logdir: Path

    @property
    def vol_dir(self) -> Path:
        return self.cinder.share_dir

    def client(self) -> Any:
        return self.cinder.client()


def _merged(
    conf: Mapping[str, Mapping[str, object]], extra: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    out = {g: dict(opts) for g, opts in conf.items()}
    for group, opts in extra.items():
        out.setdefault(group, {}).update(opts)
    return out


def _stopped(name: str, stop: Callable[[], int | None], tail: Callable[[], str]) -> None:
    """SIGTERM must end the service cleanly (0): a crash or hang on shutdown is a bug too."""
    rc = stop()
    assert rc == 0, f"{name} exited {rc}: {tail()}"


def deploy(
    share: Any,
    rabbit: Any,
    conn: Any,
    image: Any,
    agent_conf: Mapping[str, Mapping[str, object]] | None = None,
) -> Iterator[Deployment]:
    """A module fixture's body; every teardown step runs, a failed one must not leak the rest.

    ``agent_conf``: options merged over the agent's (group -> name -> value).

    noauth: callers sending no X-Roles (Cinder's ``[nova] auth_type = none``, the CLI's
    ``--os-auth-type none``) get the service and admin roles their policies need.
    """
    logdir = procs.run_dir() / f"e2e-{share.kind}-{uuid.uuid4().hex[:6]}"
    logdir.mkdir(mode=0o755)
    agent_host = f"e2e-{uuid.uuid4().hex[:6]}"
    api_opts = {"noauth_roles": "service, admin", "hosts": agent_host, "rpc_timeout": 30}
    api, api_url = start_api(logdir, rabbit.transport_url, api_opts)
    cleanup: list[Callable[[], None]] = [
        lambda: _stopped("qsnap-api", api.stop, lambda: api.tail(6000))
    ]
    try:
        cinder = CinderPeer(
            share.new_dir("cinder"),
            nova_endpoint=api_url + "/v2.1",
            extra_extensions=(CINDER_EXTENSION,),  # the agent records its own snapshots
            pythonpath=(REPO,),
        )
        cleanup.insert(0, cinder.close)
        agent = AgentProcess(
            logdir, rabbit.transport_url, share.root, host=agent_host,
            state=logdir / "agent-state", log=logdir / "qsnap-agent.log", rpc_timeout=30,
            conf=_merged({
                "agent": {"workers": 2, "merge_timeout": 300},
                "cinder": noauth_cinder(cinder, user_id="qsnap-agent"),
            }, agent_conf or {}),
        )  # fmt: skip
        cleanup.insert(0, agent.transport.cleanup)
        agent.start()
        cleanup.insert(0, lambda: _stopped("qsnap-agent", agent.stop, lambda: agent.tail(6000)))
        (vol,), guest = attached_guest(cinder, conn, image, ("/data",), logdir)
        cleanup.insert(0, guest.close)
        yield Deployment(share, cinder, api_url, agent_host, agent.api, guest, vol, logdir)
    finally:
        errors = []
        for step in cleanup:
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        assert not errors, errors
