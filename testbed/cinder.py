"""A real Cinder (from PyPI, in ``.venv-cinder``) with the real NfsDriver, as a test peer.

One subprocess runs osapi_volume, the scheduler and one volume service together because
``transport_url = fake:/`` only works inside a single process; that spares us a RabbitMQ
node and keeps start-up at a few seconds. The NFS "mount" is a no-op shim: the mount point
is a symlink to a share directory, so Cinder's volume files land where the test looks.
Beside it: volumes attached to a test guest as Nova would, and a ``CinderRecorder`` that
only records the snapshot status reports an agent sends (for exact assertions on them).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed import procs
from testbed.rabbit import free_port

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-cinder"

# ServiceLauncher (not ProcessLauncher) keeps every service in this one process.
_LAUNCHER = """\
from cinder import monkey_patch; monkey_patch.patch()  # noqa
import shlex, sys
import os_brick
from oslo_config import cfg
from oslo_log import log as logging
from oslo_privsep import priv_context
from oslo_service import service as os_service
from cinder.common import config
from cinder import coordination, objects, rpc, service, utils, version
CONF = cfg.CONF
objects.register_all()
CONF(sys.argv[1:], project="cinder", version=version.version_string())
config.set_middleware_defaults()
logging.setup(CONF, "cinder")
priv_context.init(root_helper=shlex.split(utils.get_root_helper()))
os_brick.setup(CONF)
coordination.COORDINATOR.start()
rpc.init(CONF)
launcher = os_service.ServiceLauncher(CONF)
launcher.launch_service(service.WSGIService("osapi_volume"))
launcher.launch_service(service.Service.create(binary="cinder-scheduler"))
for b in CONF.enabled_backends:
    launcher.launch_service(service.Service.create(
        host=f"{CONF.host}@{b}", service_name=b, binary="cinder-volume", coordination=True))
launcher.wait()
"""

# Cinder runs privileged commands as `sudo cinder-rootwrap CONF cmd...`; we are root already.
_SUDO = '#!/bin/sh\ncase "$1" in *cinder-rootwrap) shift 2;; esac\nexec "$@"\n'
# There is no kernel NFS client here: pretend every NFS mount succeeded.
_MOUNT = '#!/bin/sh\nfor a in "$@"; do [ "$a" = nfs ] && exit 0; done\nexec /bin/mount "$@"\n'
_MOUNT_NFS = "#!/bin/sh\nexit 0\n"

NFS_SHARE = "127.0.0.1:/qsnap"
BACKEND = "nfs1"
# With ``qcow2_backend``: a second NfsDriver backend on the same export whose volumes are
# qcow2 files (``nfs_qcow2_volumes = true``); volume types pick a backend by this name.
QCOW2_BACKEND = "nfs2"

# With two backends: Cinder's heartbeat reads the service id from a CLASS attribute that the
# last-created service set, so in this one process only that service stayed "up" and the
# other backend was reported down after service_down_time (60 s) and got no volumes.
_OWN_HEARTBEAT = (
    "_report_state = service.Service.report_state\n"
    "def _own_report_state(self):\n"
    "    service.Service.service_id = self.origin_service_id  # test bed: several services\n"
    "    _report_state(self)\n"
    "service.Service.report_state = _own_report_state\n"
)

# With ``service_requests``: Cinder treats every request as coming from a service. Nova's
# detach and delete end with attachment_delete as the user, which makes Cinder ask Nova
# through a Keystone catalog the bed does not have (EndpointNotFound, volumes stay in-use).
_SERVICE_REQUESTS = (
    "from cinder.volume import api as _volume_api\n"
    "_volume_api.API.is_service_request = staticmethod(lambda ctxt: True)  # test bed\n"
)


def _backend_lines(name: str, b: Path) -> str:
    """One NfsDriver backend on the bed's one export (raw volumes unless told otherwise)."""
    return f"""[{name}]
volume_driver = cinder.volume.drivers.nfs.NfsDriver
volume_backend_name = {name}
nfs_shares_config = {b / "nfs_shares"}
nfs_mount_point_base = {b / "mnt"}
nfs_snapshot_support = true
nas_secure_file_operations = false
nas_secure_file_permissions = false
nfs_sparsed_volumes = true
"""


class CinderPeer:
    """Cinder API at ``self.endpoint`` (``.../v3``), volumes as files in ``share_dir``."""

    def __init__(
        self,
        share_dir: Path,
        *,
        nova_endpoint: str = "http://127.0.0.1:9/v2.1",
        timeout: float = 90.0,
        extra_extensions: tuple[str, ...] = (),
        pythonpath: tuple[Path, ...] = (),
        policy: dict[str, str] | None = None,
        nova_token: str | None = None,
        qcow2_backend: bool = False,
        service_requests: bool = False,
        project_id: str | None = None,
    ) -> None:
        """``extra_extensions``: API extension classes by dotted path (beside the standard
        ones), importable from ``pythonpath``. ``policy``: rules for a policy file that
        :meth:`set_policy` can rewrite while Cinder runs (oslo.policy rereads it on change).
        ``nova_token``: call a real Nova at ``nova_endpoint`` with this token (keystoneauth's
        admin_token plugin) instead of no auth. ``qcow2_backend``: a second backend
        (:data:`QCOW2_BACKEND`) with qcow2 volumes on the same export. ``service_requests``:
        see :data:`_SERVICE_REQUESTS`. ``project_id``: a fixed (hex) project instead of a
        random one.
        """
        if not (VENV / "bin" / "cinder-manage").exists():
            raise RuntimeError(f"no Cinder venv at {VENV}: run tools/cinder_setup.sh")
        self.share_dir = share_dir
        self.project_id = project_id or uuid.uuid4().hex  # project_id_regex wants hex
        self.backends = (BACKEND, QCOW2_BACKEND) if qcow2_backend else (BACKEND,)
        self.user_id = "qsnap-test"
        self.base = procs.run_dir() / f"cinder-{uuid.uuid4().hex[:6]}"
        self.base.mkdir(mode=0o755)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/v3"
        self.log = self.base / "cinder.log"
        self.policy_file = self.base / "policy.json"
        self._write_files(
            nova_endpoint, extra_extensions, policy is not None, nova_token, service_requests
        )
        if policy is not None:
            self.set_policy(policy)
        self._env = dict(os.environ)
        self._env["PATH"] = f"{self.base / 'bin'}:{VENV / 'bin'}:{os.environ.get('PATH', '')}"
        self._env.pop("PYTHONPATH", None)
        if pythonpath:
            self._env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
        conf = ["--config-file", str(self.base / "cinder.conf")]
        subprocess.run(
            [str(VENV / "bin" / "cinder-manage"), *conf, "db", "sync"],
            env=self._env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        out = open(self.base / "launcher.out", "wb")
        self._proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), str(self.base / "launch.py"), *conf],
            env=self._env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        procs.record("cinder", self._proc.pid)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def mount_point(self) -> Path:
        """Where the NfsDriver believes the share is mounted (os-brick's md5 naming)."""
        digest = hashlib.md5(NFS_SHARE.encode(), usedforsecurity=False).hexdigest()
        return self.base / "mnt" / digest

    def set_policy(self, rules: dict[str, str]) -> None:
        """Replace the policy file; a new mtime makes oslo.policy reload it on next check."""
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.policy_file)
        # quick rewrites must still look changed to oslo.policy's mtime cache
        self._policy_mtime = max(time.time(), getattr(self, "_policy_mtime", 0.0) + 1.0)
        os.utime(self.policy_file, (self._policy_mtime, self._policy_mtime))

    def _write_files(
        self,
        nova_endpoint: str,
        extra_extensions: tuple[str, ...],
        with_policy: bool,
        nova_token: str | None = None,
        service_requests: bool = False,
    ) -> None:
        b = self.base
        ext_lines = "".join(
            f"osapi_volume_extension = {e}\n"
            for e in ("cinder.api.contrib.standard_extensions", *extra_extensions)
        )
        policy_lines = f"[oslo_policy]\npolicy_file = {self.policy_file}\n" if with_policy else ""
        (b / "bin").mkdir()
        for name, text in (("sudo", _SUDO), ("mount", _MOUNT), ("mount.nfs", _MOUNT_NFS)):
            (b / "bin" / name).write_text(text)
            os.chmod(b / "bin" / name, 0o755)
        launcher = _LAUNCHER
        anchor = "launcher = os_service.ServiceLauncher(CONF)\n"
        if service_requests:
            launcher = launcher.replace(anchor, _SERVICE_REQUESTS + anchor)
        if len(self.backends) > 1:
            launcher = launcher.replace(anchor, _OWN_HEARTBEAT + anchor)
        (b / "launch.py").write_text(launcher)
        (b / "nfs_shares").write_text(NFS_SHARE + "\n")
        (b / "mnt").mkdir(mode=0o755)
        self.mount_point.symlink_to(self.share_dir)
        etc = VENV / "etc" / "cinder"
        (b / "cinder.conf").write_text(
            f"""[DEFAULT]
auth_strategy = noauth
transport_url = fake:/
host = qsnap-cinder
my_ip = 127.0.0.1
state_path = {b / "state"}
log_file = {self.log}
debug = true
api_paste_config = {etc / "api-paste.ini"}
rootwrap_config = {etc / "rootwrap.conf"}
resource_query_filters_file = {etc / "resource_filters.json"}
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.port}
osapi_volume_workers = 1
enabled_backends = {",".join(self.backends)}
report_interval = 2
periodic_interval = 5
{ext_lines}{policy_lines}[database]
connection = sqlite:///{b / "cinder.sqlite"}
[oslo_concurrency]
lock_path = {b / "lock"}
[coordination]
backend_url = file://{b / "coord"}
{_backend_lines(BACKEND, b)}{self._qcow2_backend_lines(b)}[nova]
{self._nova_auth_lines(nova_token)}endpoint = {nova_endpoint}
"""
        )

    def _qcow2_backend_lines(self, b: Path) -> str:
        if QCOW2_BACKEND not in self.backends:
            return ""
        return _backend_lines(QCOW2_BACKEND, b) + "nfs_qcow2_volumes = true\n"

    @staticmethod
    def _nova_auth_lines(nova_token: str | None) -> str:
        if nova_token is None:
            return "auth_type = none\n"
        return f"auth_type = admin_token\ntoken = {nova_token}\n"

    def get(self, path: str) -> Any:
        """A raw GET on the API (noauth token), for checks the client does not expose."""
        # the URL is our own http:// endpoint, built above
        req = urllib.request.Request(  # noqa: S310
            f"{self.endpoint}/{self.project_id}/{path}",
            headers={"X-Auth-Token": f"{self.user_id}:{self.project_id}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    def _wait_ready(self, timeout: float) -> None:
        """Ready = the scheduler knows a pool: 'services up' comes before volumes can land."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"cinder exited rc={self._proc.returncode}: {self.tail()}")
            try:
                pools = self.get("scheduler-stats/get_pools").get("pools") or []
                if len(pools) >= len(self.backends):
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.25)
        raise TimeoutError(f"cinder not ready in {timeout}s ({last}): {self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        out = (self.base / "launcher.out").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:] + out[-n:])

    def client(self, api_version: str = "3.44") -> Any:
        """A python-cinderclient v3 client speaking noauth to this Cinder."""
        from cinderclient import api_versions
        from cinderclient import client as cclient
        from cinderclient.contrib.noauth import CinderNoAuthPlugin
        from keystoneauth1 import session

        auth = CinderNoAuthPlugin(self.user_id, self.project_id, endpoint=self.endpoint)
        return cclient.Client(
            api_versions.APIVersion(api_version), session=session.Session(auth=auth)
        )

    def close(self) -> None:
        if self._proc.poll() is None:
            procs.stop(self._proc.pid, group=True)
        self._proc.wait(timeout=10)
        procs.forget("cinder", self._proc.pid)

    def __enter__(self) -> CinderPeer:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# A connector as Nova's compute sends it when it attaches a file-based volume.
CONNECTOR = {
    "host": "qsnap-testbed-host",
    "ip": "127.0.0.1",
    "initiator": "iqn.2004-10.org.qsnap:testbed",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": False,
}


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


def attach(client: Any, volume_id: str, instance_uuid: str, timeout: float = 120) -> Any:
    """Attach through the attachments API as Nova does (create + complete); the volume,
    once ``in-use`` (or ``error``)."""
    att = client.attachments.create(volume_id, CONNECTOR, instance_uuid, mode="rw")
    client.attachments.complete(att["id"] if isinstance(att, dict) else att.id)  # a dict here
    return wait_status(client.volumes.get, volume_id, {"in-use", "error"}, timeout)


def attached_guest(
    cinder: CinderPeer, conn: Any, image: Any, mounts: tuple[str, ...], logdir: Path
) -> tuple[list[str], Any]:
    """Cinder volumes (raw files on its share) holding ext4, booted as one guest's disks
    ``vda``, ``vdb``... (mounted at ``mounts``) and attached to it (instance = the domain's
    UUID): the volume ids and the ``VolumeGuest``."""
    from testbed.guest import GuestDisk, VolumeGuest

    c = cinder.client()
    made = [c.volumes.create(1, name=f"tb-{uuid.uuid4().hex[:6]}") for _ in mounts]
    made = [wait_status(c.volumes.get, v.id, {"available", "error"}) for v in made]
    if any(v.status != "available" for v in made):
        raise RuntimeError(f"a volume is not available: {cinder.tail()}")
    vols = [str(v.id) for v in made]
    # no lazy init: the guest kernel would write inode tables in the background for
    # minutes, and "nothing on the share changed" needs an idle disk
    mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    disks = []
    for i, (vid, mount) in enumerate(zip(vols, mounts, strict=True)):
        path = cinder.share_dir / f"volume-{vid}"
        if not path.is_file():
            raise RuntimeError(f"the NfsDriver did not write {path}")
        subprocess.run([*mkfs, str(path)], check=True, capture_output=True)
        disks.append(GuestDisk(f"vd{chr(ord('a') + i)}", vid, path, mount, "raw"))
    guest = VolumeGuest(conn, image, disks, logdir)
    try:
        for vid in vols:
            if attach(c, vid, guest.uuid).status != "in-use":
                raise RuntimeError(f"volume {vid} not attached: {cinder.tail()}")
    except BaseException:
        guest.close()
        raise
    return vols, guest


class CinderRecorder:
    """Stands in for Cinder's ``os-update_snapshot_status`` API: records the bodies of
    ``POST .../snapshots/<id>/action`` as ``(snapshot_id, status)`` and answers 202."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.project_id = uuid.uuid4().hex
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)))
                parts = self.path.split("/")
                if "snapshots" in parts and parts[-1] == "action":
                    sid = parts[parts.index("snapshots") + 1]
                    recorder.updates.append((sid, body["os-update_snapshot_status"]))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v3"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # manual smoke run: python -m testbed.cinder
    from testbed.shares import DirShare

    sh = DirShare()
    t0 = time.monotonic()
    with CinderPeer(sh.new_dir("cinder")) as peer:
        print(f"ready in {time.monotonic() - t0:.1f}s at {peer.endpoint}", file=sys.stderr)
        print(peer.get("scheduler-stats/get_pools"))
    sh.close()
