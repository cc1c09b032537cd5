"""A REAL Nova (34, from PyPI in ``.venv-nova``) as a test peer, beside the bed's real Cinder.

Why: a snapshot taken behind Nova's back leaves Nova's block-device mapping (BDM) naming the
old file, and the next hard reboot or start rebuilds the domain from the BDM (nova.md). Only a
real Nova shows what it keeps and reads back. One ``NovaCloud``: a private MariaDB (sqlite
flaked under the conductor) and RabbitMQ, Placement, nova-api behind the TEST-BED auth
middleware (testbed/nova_auth.py), conductor, scheduler and nova-compute on
``qemu:///system`` (TCG), the Neutron STUB, and a CinderPeer whose ``[nova]`` is this nova-api.
Servers boot from a bootable Cinder volume (testbed/nova_boot.py); their domains are named
``qsnap-<run>-nova-<uuid>`` so the leftover audit sees them. Bring-up runs the independent
parts in parallel (~30-45 s); ``close()`` stops everything by pid.

``compute_driver``: Nova's own form (``libvirt.LibvirtDriver``, loaded as ``nova.virt.<value>``)
or a full dotted path importable in ``.venv-nova`` (``api_ext.nova_driver.QsnapLibvirtDriver``;
the bed's compute launcher aliases that module under ``nova.virt``). ``extra_nova_conf`` groups
merge over the bed's nova.conf (e.g. ``{"qsnap": {...}}`` for that driver's option group).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cinderclient.exceptions import NotFound

from libvirt_ops import Connection, find_disk
from testbed import procs
from testbed.cinder import BACKEND as RAW_BACKEND
from testbed.cinder import QCOW2_BACKEND, REPO, CinderPeer, wait_status
from testbed.guestimage import GuestImage, build_guest_image
from testbed.host import LibvirtHost
from testbed.mariadb import MariaDB
from testbed.neutron_stub import NeutronStub
from testbed.nova_boot import boot_image
from testbed.nova_conf import STOCK_DRIVER, VENV, NovaFiles, Ports, nova_sections, write_files
from testbed.nova_guest import (
    LoopShare,
    NovaGuest,
    Server,
    clean_base,
    destroy_domains,
    unmount_all,
)
from testbed.nova_records import NovaRecords
from testbed.nova_services import (
    NovaBedError,
    Services,
    http_json,
    init_databases,
    nova_env,
    wait_queue,
)
from testbed.rabbit import RabbitNode, free_port
from testbed.service import write_conf
from testbed.shares import GlusterShare

CINDER_EXTENSION = "api_ext.cinder_extension.Qsnap_snapshot_metadata"

__all__ = ["STOCK_DRIVER", "NovaBedError", "NovaCloud", "NovaGuest", "Server"]

FLAVOR = "qsnap-tiny"
VOLUME_TYPES = {"raw": ("qsnap-raw", RAW_BACKEND), "qcow2": ("qsnap-qcow2", QCOW2_BACKEND)}
_MAX_DOMAIN_NAME = 107 - len("/var/lib/libvirt/qemu/org.qemu.guest_agent.0..sock")


class NovaCloud(NovaRecords):
    """Nova + Placement + Cinder on one share kind (``"dir"`` or ``"gluster"``)."""

    def __init__(
        self,
        share_kind: str = "dir",
        *,
        compute_driver: str = STOCK_DRIVER,
        extra_nova_conf: Mapping[str, Mapping[str, str]] | None = None,
        image: GuestImage | None = None,
        conn: Connection | None = None,
        timeout: float = 240.0,
    ) -> None:
        t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.share_kind = share_kind
        self.compute_driver = compute_driver
        self.extra_nova_conf = {g: dict(o) for g, o in (extra_nova_conf or {}).items()}
        self.project_id = uuid.uuid4().hex
        self.token = f"admin:{self.project_id}"
        self.base = procs.run_dir() / f"nova-{uuid.uuid4().hex[:6]}"
        self.base.mkdir(mode=0o755)
        self.host = f"qsnap-{procs.run_id()}-{self.base.name}"
        # domain names carry the run id (the leftover audit) and must stay short: libvirt's
        # agent socket /var/lib/libvirt/qemu/org.qemu.guest_agent.0.<name>.sock has 107 bytes
        self.name_prefix = f"qsnap-{procs.run_id()}-nova{self.base.name[-4:]}-"
        room = _MAX_DOMAIN_NAME - len(self.name_prefix)
        if room < 8:
            raise NovaBedError(f"run id {procs.run_id()!r} too long for libvirt socket paths")
        self.name_template = f"{self.name_prefix}%(uuid).{min(room, 36)}s"
        self.ports = Ports(placement=free_port(), api=free_port())
        self.endpoint = f"http://127.0.0.1:{self.ports.api}/v2.1"
        self.servers: list[Server] = []
        self._stack = ExitStack()
        self._deadline = t0 + timeout
        self._own_conn = conn is None
        if conn is None:
            LibvirtHost.ensure_daemons()
        self.conn = conn or Connection("qemu:///system")
        if self._own_conn:
            self._stack.callback(self.conn.close)
        try:
            self._bring_up(image)
        except BaseException:
            self.close()
            raise
        self.timings["total"] = time.monotonic() - t0

    # -- bring-up ------------------------------------------------------------------------
    def _bring_up(self, image: GuestImage | None) -> None:
        if not (VENV / "bin" / "nova-manage").exists():
            raise NovaBedError(f"no Nova venv at {VENV}: run tools/nova_setup.sh")
        self.neutron = NeutronStub()
        self._stack.callback(self.neutron.close)
        t0 = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(4)
        self._stack.callback(pool.shutdown)
        # each start's result is closed at teardown even when the bring-up fails elsewhere;
        # registered here, in this order, so teardown runs cinder, rabbit, db (reverse)
        f_db = self._start(pool, "mariadb", MariaDB, self.base / "mariadb")
        f_rabbit = self._start(pool, "rabbitmq", RabbitNode)
        f_cinder = self._start(pool, "share+cinder", self._start_cinder)
        f_image = pool.submit(self._timed, "boot image", boot_image, image or build_guest_image())
        self.db: MariaDB = f_db.result()
        # nova.conf is written twice: first for the schema syncs (which need only the
        # databases), then with the RabbitMQ and Cinder endpoints once those are up
        self._write_files("fake:/", Path("/nonexistent"), "http://127.0.0.1:9/v3")
        self.env = nova_env(self.files)
        self._stack.callback(self._unmount_nova)
        self.timings["db sync"] = init_databases(
            self.db, self.files, self.env, lambda: str(f_rabbit.result().transport_url)
        )
        self.rabbit: RabbitNode = f_rabbit.result()
        self.rabbit_url = self.rabbit.transport_url
        self.cinder, self.share = f_cinder.result()
        self._write_files(self.rabbit_url, self._share_dir, self.cinder.endpoint)
        self.svc = Services(self.files, self.env, self.ports, self.compute_driver)
        self._stack.callback(self.svc.stop_all)
        for name in ("placement-api", "nova-api", "nova-conductor", "nova-scheduler"):
            self.svc.start(name)
        self.svc.wait_http(
            "placement-api", f"http://127.0.0.1:{self.ports.placement}/",
            {"X-Auth-Token": "admin"}, self._deadline,
        )  # fmt: skip
        # else compute's first conductor ping may be dropped: a 10 s timeout, then a retry
        wait_queue(self.rabbit.amqp_url, "conductor", self._deadline, self.svc.check)
        # compute's first resource report must find Placement up (the next is a minute later)
        self.svc.start("nova-compute")
        self.boot_image: Path = f_image.result()
        self.svc.wait_http("nova-api", f"http://127.0.0.1:{self.ports.api}/", {}, self._deadline)
        self._wait_compute_mapped()
        self.timings["to services ready"] = time.monotonic() - t0
        self._create_flavor_and_types()

    def _timed(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.monotonic()
        out = fn(*args)
        self.timings[what] = time.monotonic() - t
        return out

    def _start(
        self,
        pool: concurrent.futures.ThreadPoolExecutor,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
    ) -> concurrent.futures.Future[Any]:
        """Run a start in the pool; its result(s) get closed at teardown, whatever happens."""
        fut = pool.submit(self._timed, what, fn, *args)

        def closer() -> None:
            try:
                res = fut.result()
            except BaseException:  # the start failed and cleaned up after itself
                return
            for obj in res if isinstance(res, tuple) else (res,):
                obj.close()

        self._stack.callback(closer)
        return fut

    def _write_files(self, transport_url: str, share_dir: Path, cinder_endpoint: str) -> None:
        self._sections = nova_sections(
            files=self._files_layout(), host=self.host, name_template=self.name_template,
            transport_url=transport_url, api_db=self.db.url("nova_api"),
            cell_db=self.db.url("nova_cell1"), ports=self.ports,
            cinder_endpoint=cinder_endpoint, project_id=self.project_id,
            neutron_url=self.neutron.url, compute_driver=self.compute_driver,
        )  # fmt: skip
        self.files: NovaFiles = write_files(
            self.base, share_dir=share_dir, sections=self._sections,
            extra=self.extra_nova_conf, placement_db=self.db.url("placement"),
            cell0_db=self.db.url("nova_cell0"),
        )  # fmt: skip

    def _files_layout(self) -> NovaFiles:
        b = self.base
        return NovaFiles(b, b / "nova.conf", b / "nova-cell0.conf", b / "placement",
                         b / "bin", b / "mnt", b / "instances", b / "log")  # fmt: skip

    def _start_cinder(self) -> tuple[CinderPeer, LoopShare | GlusterShare]:
        """The share, then Cinder on it; (cinder, share): closed in that order."""
        share: LoopShare | GlusterShare
        if self.share_kind == "dir":
            share = LoopShare()
        elif self.share_kind == "gluster":
            share = GlusterShare()
        else:
            raise ValueError(f"unknown share kind {self.share_kind!r}")
        try:
            self._share_dir = share.new_dir("cinder")
            peer = CinderPeer(
                self._share_dir,
                # as deployed beside qsnap: its snapshot-metadata extension loaded
                extra_extensions=(CINDER_EXTENSION,),
                pythonpath=(REPO,),
                nova_endpoint=self.endpoint,
                nova_token=self.token,
                qcow2_backend=True,
                service_requests=True,
                project_id=self.project_id,
            )
        except BaseException:
            share.close()
            raise
        return peer, share

    def _write_nova_conf(self) -> None:
        merged = {g: dict(o) for g, o in self._sections.items()}
        for group, opts in self.extra_nova_conf.items():
            merged[group] = {**merged.get(group, {}), **opts}
        write_conf(self.files.nova_conf, merged)

    def _wait_compute_mapped(self) -> None:
        """Ready to schedule: the scheduler mapped our compute host (its periodic discovery)
        and Placement has its resource provider."""
        t = time.monotonic()
        while True:
            self.svc.check()
            mapped = self.db.sql(
                f"SELECT host FROM host_mappings WHERE host = '{self.host}'",  # noqa: S608 -- ours
                "nova_api",
                check=False,
            ).stdout.split()  # fmt: skip
            if mapped:
                status, rps = http_json(
                    "GET", f"http://127.0.0.1:{self.ports.placement}/resource_providers",
                    headers={"X-Auth-Token": "admin"},
                )  # fmt: skip
                if status == 200 and rps.get("resource_providers"):
                    self.timings["compute mapped"] = time.monotonic() - t
                    return
            if time.monotonic() > self._deadline:
                raise NovaBedError(
                    "nova-compute not mapped/registered in time:\n"
                    + self.svc.tails("nova-compute", "nova-scheduler", "nova-conductor")
                )
            time.sleep(0.25)

    def _create_flavor_and_types(self) -> None:
        status, body = self.api("POST", "/flavors", {"flavor": {
            "name": FLAVOR, "id": FLAVOR, "ram": 512, "vcpus": 1, "disk": 0}})  # fmt: skip
        if status != 200:
            raise NovaBedError(f"flavor create: {status} {body}")
        c = self.cinder.client()
        for name, backend in VOLUME_TYPES.values():
            vt = c.volume_types.create(name)
            vt.set_keys({"volume_backend_name": backend})

    # -- API -----------------------------------------------------------------------------
    def api(
        self, method: str, path: str, body: Any = None, microversion: str = "2.90"
    ) -> tuple[int, Any]:
        """A raw Nova API call as admin of the project; (status, JSON body or None)."""
        return http_json(
            method, f"{self.endpoint}{path}", body,
            {"X-Auth-Token": self.token, "OpenStack-API-Version": f"compute {microversion}"},
        )  # fmt: skip

    def server(self, server_id: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/servers/{server_id}")
        if status != 200:
            raise NovaBedError(f"GET server {server_id}: {status} {body}")
        return dict(body["server"])

    def wait_server(self, server_id: str, want: str, timeout: float = 180.0) -> dict[str, Any]:
        """Until ``status == want`` with no task running; ERROR raises with Nova's fault."""
        deadline = time.monotonic() + timeout
        while True:
            srv = self.server(server_id)
            if srv["status"] == want and not srv.get("OS-EXT-STS:task_state"):
                return srv
            if srv["status"] == "ERROR" or time.monotonic() > deadline:
                self.svc.check()
                raise NovaBedError(
                    f"server {server_id} is {srv['status']}/{srv.get('OS-EXT-STS:task_state')}"
                    f" (wanted {want}): {srv.get('fault')}\n"
                    + self.svc.tails("nova-compute", "nova-conductor", n=30)
                )
            time.sleep(0.3)

    # -- volumes -------------------------------------------------------------------------
    def create_volume(self, size_gb: int = 1, fmt: str = "raw", name: str | None = None) -> str:
        """A Cinder volume on the raw (``nfs_qcow2_volumes = false``) or the qcow2 backend."""
        c = self.cinder.client()
        vol = c.volumes.create(
            size_gb, name=name or f"qsnap-{uuid.uuid4().hex[:6]}", volume_type=VOLUME_TYPES[fmt][0]
        )
        vol = wait_status(c.volumes.get, vol.id, {"available", "error"})
        if vol.status != "available":
            raise NovaBedError(f"volume {vol.id} is {vol.status}: {self.cinder.tail()}")
        return str(vol.id)

    def _bootable_volume(self, size_gb: int) -> str:
        vid = self.create_volume(size_gb, "raw")
        subprocess.run(
            ["dd", f"if={self.boot_image}", f"of={self.volume_path(vid)}", "bs=1M",
             "conv=notrunc,sparse,fsync", "status=none"], check=True, timeout=120,
        )  # fmt: skip
        c = self.cinder.client()
        c.volumes.set_bootable(vid, True)
        c.volumes.set_image_metadata(vid, {"hw_qemu_guest_agent": "yes"})
        return vid

    def boot_server(self, volume_size_gb: int = 1, name: str | None = None) -> Server:
        """Boot from a new bootable raw volume; ACTIVE and its qemu-ga answering."""
        vid = self._bootable_volume(volume_size_gb)
        status, body = self.api("POST", "/servers", {"server": {
            "name": name or f"qsnap-{uuid.uuid4().hex[:6]}", "flavorRef": FLAVOR,
            "networks": "none", "block_device_mapping_v2": [{
                "boot_index": 0, "uuid": vid, "source_type": "volume",
                "destination_type": "volume", "delete_on_termination": False}]}})  # fmt: skip
        if status != 202:
            raise NovaBedError(f"server create: {status} {body}")
        sid = str(body["server"]["id"])
        srv = self.wait_server(sid, "ACTIVE")
        guest = NovaGuest(self.conn, sid, self.files.instances / sid)
        server = Server(sid, vid, str(srv["OS-EXT-SRV-ATTR:instance_name"]), guest)
        self.servers.append(server)
        guest.wait_agent(120)
        return server

    def attach(self, server: Server, volume_id: str, timeout: float = 120.0) -> str:
        """Attach through Nova; returns Nova's device name once Cinder says in-use and the
        disk is in the live domain."""
        status, body = self.api(
            "POST", f"/servers/{server.id}/os-volume_attachments",
            {"volumeAttachment": {"volumeId": volume_id}},
        )  # fmt: skip
        if status != 200:
            raise NovaBedError(f"attach {volume_id}: {status} {body}")
        c = self.cinder.client()
        vol = wait_status(c.volumes.get, volume_id, {"in-use", "error", "available"}, timeout)
        deadline = time.monotonic() + timeout
        while vol.status == "available" or not self._in_live_xml(server, volume_id):
            if vol.status == "error" or time.monotonic() > deadline:
                raise NovaBedError(f"attach {volume_id}: volume {vol.status}\n"
                                   + self.svc.tails("nova-compute", n=30))  # fmt: skip
            time.sleep(0.3)
            vol = c.volumes.get(volume_id)
        server.volumes.append(volume_id)
        server.guest.refresh_disks()
        return str(body["volumeAttachment"]["device"])

    def detach(self, server: Server, volume_id: str, timeout: float = 180.0) -> None:
        """Detach through Nova; returns once Cinder says available and the disk is gone from
        the live domain (the guest must have let go of it: unmount first)."""
        status, body = self.api("DELETE", f"/servers/{server.id}/os-volume_attachments/{volume_id}")
        if status != 202:
            raise NovaBedError(f"detach {volume_id}: {status} {body}")
        c, deadline = self.cinder.client(), time.monotonic() + timeout
        while True:
            vol = c.volumes.get(volume_id)
            if vol.status == "available" and not self._in_live_xml(server, volume_id):
                break
            if vol.status in ("error", "error_detaching") or time.monotonic() > deadline:
                raise NovaBedError(f"detach {volume_id}: volume {vol.status}\n"
                                   + self.svc.tails("nova-compute", n=30))  # fmt: skip
            time.sleep(0.3)
        if volume_id in server.volumes:
            server.volumes.remove(volume_id)
        server.guest.refresh_disks()

    def delete_volume(self, volume_id: str, cascade: bool = True, timeout: float = 180.0) -> None:
        """Cinder's delete (``cascade``: its snapshots first); returns once the volume is gone.
        A refusal (e.g. snapshots without ``cascade``) raises cinderclient's BadRequest."""
        c = self.cinder.client()
        c.volumes.delete(volume_id, cascade=cascade)
        self._wait_gone(c.volumes.get, volume_id, timeout)

    def _in_live_xml(self, server: Server, volume_id: str) -> bool:
        try:
            find_disk(server.guest.dom, volume_id=volume_id)
        except Exception:
            return False
        return True

    def mount_volume(self, server: Server, volume_id: str, mountpoint: str) -> str:
        """mkfs + mount a hot-plugged volume in the guest (found by its virtio serial)."""
        return server.guest.mount_volume(volume_id, mountpoint)

    def snapshot(self, volume_id: str, timeout: float = 180.0, settle: float = 30.0) -> str:
        """A Cinder snapshot with ``force=True`` (in-use: Cinder asks Nova to take it); see
        :meth:`settle` for ``settle``."""
        c = self.cinder.client()
        snap = c.volume_snapshots.create(volume_id, force=True)
        snap = wait_status(c.volume_snapshots.get, snap.id, {"available", "error"}, timeout)
        if snap.status != "available":
            raise NovaBedError(f"snapshot {snap.id} is {snap.status}: {self.cinder.tail()}")
        self.settle(volume_id, settle)
        return str(snap.id)

    def delete_snapshot(
        self, snapshot_id: str, timeout: float = 180.0, settle: float = 30.0
    ) -> None:
        c = self.cinder.client()
        volume_id = str(c.volume_snapshots.get(snapshot_id).volume_id)
        c.volume_snapshots.delete(snapshot_id)
        self._wait_gone(c.volume_snapshots.get, snapshot_id, timeout)
        self.settle(volume_id, settle)

    def _wait_gone(self, get: Callable[[str], Any], obj_id: str, timeout: float) -> None:
        """Until ``get`` answers 404; one GET per poll (a list-then-get pair raced Cinder's
        purge in CI). ``error_deleting`` or the deadline raise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                obj = get(obj_id)
            except NotFound:
                return
            if obj.status == "error_deleting" or time.monotonic() > deadline:
                raise NovaBedError(f"{obj_id} is {obj.status}: {self.cinder.tail()}")
            time.sleep(0.3)

    # -- life cycle ----------------------------------------------------------------------
    def _action(self, server: Server, action: dict[str, Any], want: str) -> None:
        before = server.guest.domain_id()
        status, body = self.api("POST", f"/servers/{server.id}/action", action)
        if status != 202:
            raise NovaBedError(f"{action}: {status} {body}")
        self.wait_server(server.id, want)
        if want == "ACTIVE":
            if server.guest.domain_id() in (before, -1):
                raise NovaBedError(f"{action}: the domain of {server.id} was not recreated")
            server.guest.wait_agent(120)
            server.guest.refresh_disks()

    def reboot_hard(self, server: Server) -> None:
        self._action(server, {"reboot": {"type": "HARD"}}, "ACTIVE")

    def stop(self, server: Server) -> None:
        self._action(server, {"os-stop": None}, "SHUTOFF")

    def start(self, server: Server) -> None:
        self._action(server, {"os-start": None}, "ACTIVE")

    def restart_compute(
        self,
        compute_driver: str | None = None,
        extra_nova_conf: Mapping[str, Mapping[str, str]] | None = None,
        timeout: float = 120.0,
    ) -> None:
        """Restart nova-compute alone (optionally with another driver or more conf) and wait
        until Nova reports it up again; running domains keep running."""
        if compute_driver is not None:
            self.compute_driver = self._sections["DEFAULT"]["compute_driver"] = compute_driver
            self.svc.argv["nova-compute"][2] = compute_driver
        for group, opts in (extra_nova_conf or {}).items():
            self.extra_nova_conf[group] = {**self.extra_nova_conf.get(group, {}), **opts}
        self._write_nova_conf()
        self.svc.stop("nova-compute", timeout=3.0)
        since = time.time()
        self.svc.start("nova-compute")
        deadline = time.monotonic() + timeout
        while True:
            self.svc.check()
            _, body = self.api("GET", f"/os-services?binary=nova-compute&host={self.host}")
            for s in (body or {}).get("services", []):
                upd = s.get("updated_at") or ""
                if s["state"] == "up" and upd and _epoch(upd) > since:
                    return
            if time.monotonic() > deadline:
                raise NovaBedError("nova-compute not back up:\n" + self.svc.tails("nova-compute"))
            time.sleep(0.5)

    # -- teardown ------------------------------------------------------------------------
    def delete_server(self, server: Server, timeout: float = 90.0) -> None:
        status, _ = self.api("DELETE", f"/servers/{server.id}")
        deadline = time.monotonic() + timeout
        while status != 404:
            if time.monotonic() > deadline:
                raise NovaBedError(f"server {server.id} not deleted in {timeout}s")
            time.sleep(0.3)
            status, _ = self.api("GET", f"/servers/{server.id}")
        server.guest.close()
        if server in self.servers:
            self.servers.remove(server)

    def _unmount_nova(self) -> None:
        unmount_all(self.base / "mnt")

    def close(self) -> None:
        """Delete servers through Nova, stop every process by pid, unmount, remove files."""
        for server in list(self.servers):
            try:
                self.delete_server(server)
            except Exception:  # noqa: S110 -- the domain goes below either way
                pass
        try:
            destroy_domains(self.conn, self.name_prefix)
        finally:
            self._stack.close()  # reverse order: services, unmounts, rabbit, db, cinder, share
            for server in self.servers:
                server.guest.close()
            self.servers.clear()
            clean_base(self.base, keep="log")

    def __enter__(self) -> NovaCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _epoch(stamp: str) -> float:
    """Nova's ``updated_at`` (UTC, ISO, no zone) as epoch seconds."""
    from datetime import UTC, datetime

    return datetime.fromisoformat(stamp.replace("Z", "")).replace(tzinfo=UTC).timestamp()
