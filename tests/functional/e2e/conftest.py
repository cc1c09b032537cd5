"""One real deployment per share kind: Cinder 29 (NfsDriver) -> qsnap-api -> RabbitMQ ->
qsnap-agent -> libvirt guest whose disk is the Cinder volume file.

Everything is module-scoped (one Cinder, one API, one agent, one TCG guest per share kind)
because a boot and a Cinder start cost seconds each on this 2-core host; the tests walk the
deployment through many steps instead. Start order breaks the circular wiring: the API
needs only RabbitMQ and the agent's host name; Cinder needs the API's URL; the agent needs
Cinder's URL and project.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hostagent.config import make_conf
from hostagent.rpc.client import AgentAPI, get_transport
from testbed import procs
from testbed.cinder import REPO, CinderPeer
from testbed.guest import Guest, GuestDisk, GuestError, _Dispatcher, _EventLatch, domain_xml

CINDER_EXTENSION = "api_ext.cinder_extension.Qsnap_snapshot_metadata"
CONNECTOR = {
    "host": "qsnap-e2e-host",
    "ip": "127.0.0.1",
    "initiator": "iqn.2004-10.org.qsnap:e2e",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": False,
}


class VolumeGuest(Guest):
    """A test guest booted on EXISTING volume files (Cinder's), not bed-made ones."""

    def __init__(
        self,
        conn: Any,
        image: Any,
        disks: list[GuestDisk],
        logdir: Path,
        boot_timeout: float = 90.0,
    ) -> None:
        self.conn = conn
        self.dir = disks[0].path.parent
        self.uuid = str(uuid.uuid4())
        self.name = f"qsnap-{procs.run_id()}-{self.uuid[:8]}"
        self.console = logdir / f"{self.name}.console"  # not on the share: listings stay exact
        self.disks = disks
        self._latch = _EventLatch()
        self._dispatch = _Dispatcher.of(conn)
        self._dispatch.latches[self.uuid] = self._latch
        xml = domain_xml(self.name, self.uuid, image, disks, self.console)
        t0 = time.monotonic()
        self._dom = conn.get().createXML(xml, 0)
        self._dom_gen = conn.generation
        try:
            self.wait_agent(boot_timeout)
        except GuestError as exc:
            tail = self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""
            self.destroy()
            raise GuestError(f"{exc}; console tail:\n{tail}") from exc
        self.boot_to_agent_s = time.monotonic() - t0


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


def wait_status(get: Any, obj_id: str, want: set[str], timeout: float = 120) -> Any:
    """Poll a cinderclient ``get`` until the object's status is in ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        obj = get(obj_id)
        if obj.status in want:
            return obj
        if time.monotonic() > deadline:
            raise TimeoutError(f"{obj_id} still {obj.status}, wanted {want}")
        time.sleep(0.2)


def _agent_conf(path: Path, host: str, rabbit: Any, share: Any, cinder: CinderPeer) -> None:
    path.write_text(
        f"[DEFAULT]\nhost = {host}\ntransport_url = {rabbit.transport_url}\n"
        f"state_path = {path.parent / 'agent-state'}\n"
        f"[shares]\nallowed_roots = {share.root}\n"
        "[agent]\nworkers = 2\nmerge_timeout = 300\n"
        f"[cinder]\nauth_type = noauth\nendpoint = {cinder.endpoint}\n"
        f"project_id = {cinder.project_id}\nuser_id = qsnap-agent\n"
    )


def _api_conf(path: Path, rabbit: Any, agent_host: str) -> None:
    """noauth; callers sending no X-Roles (Cinder's ``[nova] auth_type = none``, the CLI's
    ``--os-auth-type none``) get the service and admin roles their policies need."""
    path.write_text(
        f"[DEFAULT]\ntransport_url = {rabbit.transport_url}\n"
        "[api]\nbind_host = 127.0.0.1\nbind_port = 0\nauth_strategy = noauth\n"
        f"noauth_roles = service, admin\nhosts = {agent_host}\nrpc_timeout = 30\n"
    )


def _attached_volume(cinder: CinderPeer, conn: Any, image: Any, logdir: Path) -> tuple[str, Any]:
    """A Cinder volume (raw file on the share) holding ext4, booted as the guest's vda and
    attached to it through the attachments API (instance = the domain's UUID)."""
    c = cinder.client()
    v = c.volumes.create(1, name=f"e2e-{uuid.uuid4().hex[:6]}")
    v = wait_status(c.volumes.get, v.id, {"available", "error"})
    assert v.status == "available", cinder.tail()
    path = cinder.share_dir / f"volume-{v.id}"
    assert path.is_file(), f"the NfsDriver did not write {path}"
    # no lazy init: the guest kernel would write inode tables in the background for
    # minutes, and "nothing on the share changed" needs an idle disk
    mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    subprocess.run([*mkfs, str(path)], check=True, capture_output=True)
    guest = VolumeGuest(conn, image, [GuestDisk("vda", v.id, path, "/data", "raw")], logdir)
    try:
        att = c.attachments.create(v.id, CONNECTOR, guest.uuid, mode="rw")
        c.attachments.complete(att["id"] if isinstance(att, dict) else att.id)
        v = wait_status(c.volumes.get, v.id, {"in-use", "error"})
        assert v.status == "in-use", cinder.tail()
    except BaseException:
        guest.close()
        raise
    return v.id, guest


def _spawn(name: str, argv: list[str], logdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a service that prints a READY line; all its output goes to ``logdir/name.log``
    (kept for post-mortems). faulthandler is on so a hung shutdown can be made to talk."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"},
        )
    procs.record(name, proc.pid)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY"):
                return proc, line
        time.sleep(0.1)
    _stopped(name, proc, logdir, expect_ok=False)
    raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-3000:]}")


def _stopped(
    name: str, proc: subprocess.Popen[bytes], logdir: Path, expect_ok: bool = True
) -> None:
    """SIGTERM must end the service cleanly (0): a crash or hang on shutdown is a bug too.
    A hang gets SIGABRT, which makes faulthandler dump every thread into the log."""
    log = logdir / f"{name}.log"
    proc.terminate()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = None
    finally:
        procs.forget(name, proc.pid)
    assert rc == 0 or not expect_ok, f"{name} exited {rc}: {log.read_text()[-6000:]}"


@pytest.fixture(scope="module")
def deployment(
    share: Any, rabbitmq: Any, libvirt_host: Any, guest_image: Any
) -> Iterator[Deployment]:
    logdir = procs.run_dir() / f"e2e-{share.kind}-{uuid.uuid4().hex[:6]}"
    logdir.mkdir(mode=0o755)
    agent_host = f"e2e-{uuid.uuid4().hex[:6]}"
    _api_conf(logdir / "qsnap-api.conf", rabbitmq, agent_host)
    api_argv = [sys.executable, "-m", "api_ext.server", "--config-file"]
    api_proc, line = _spawn(
        "qsnap-api", [*api_argv, str(logdir / "qsnap-api.conf"), "--ready-line"], logdir
    )
    api_url = f"http://127.0.0.1:{line.split()[1]}"
    transport = get_transport(make_conf(), rabbitmq.transport_url)
    cleanup: list[Any] = [transport.cleanup, lambda: _stopped("qsnap-api", api_proc, logdir)]
    try:
        cinder = CinderPeer(
            share.new_dir("cinder"),
            nova_endpoint=api_url + "/v2.1",
            extra_extensions=(CINDER_EXTENSION,),  # the agent records its own snapshots
            pythonpath=(REPO,),
        )
        cleanup.insert(0, cinder.close)
        _agent_conf(logdir / "agent.conf", agent_host, rabbitmq, share, cinder)
        agent_argv = [sys.executable, "-m", "hostagent.cli", "--config-file"]
        agent_proc, _ = _spawn(
            "qsnap-agent", [*agent_argv, str(logdir / "agent.conf"), "--ready-line"], logdir
        )
        cleanup.insert(0, lambda: _stopped("qsnap-agent", agent_proc, logdir))
        vol, guest = _attached_volume(cinder, libvirt_host.connection, guest_image, logdir)
        cleanup.insert(0, guest.close)
        yield Deployment(
            share, cinder, api_url, agent_host, AgentAPI(transport, agent_host, timeout=30),
            guest, vol, logdir,
        )  # fmt: skip
    finally:
        errors = []
        for step in cleanup:  # every step runs: a failed one must not leak the rest
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        assert not errors, errors
