"""qsnap's libvirt driver for nova-compute: Nova's assisted volume snapshots run by the agent.

Loaded only inside nova-compute (``compute_driver = qsnap.QsnapLibvirtDriver``, through the
``nova.virt.qsnap`` module that ``python -m api_ext.nova_shim install`` writes). It differs from
stock ``LibvirtDriver`` in two places only:

- ``volume_snapshot_create``/``volume_snapshot_delete`` hand the hypervisor work to the local
  qsnap agent (which journals it, checks it against Cinder's ``.info``, owns freeze/thaw and
  recovers after a crash), then report to Cinder, wait and refresh the BDM exactly as stock
  Nova does. Any failure takes stock Nova's error path ('error'/'error_deleting' to Cinder).
- ``init_host`` starts the endpoint the agent calls after chain changes it makes by itself
  (:mod:`hostagent.rpc.nova_side`), so a hard reboot never reopens a stale file from the BDM.

The nova-free logic lives in :mod:`api_ext.nova_agent` (unit-tested without Nova).
"""

from __future__ import annotations

from typing import Any

import nova.conf
import oslo_messaging as om
from nova import context as nova_context
from nova import exception, objects, utils
from nova.i18n import _
from nova.virt.libvirt import driver as libvirt_driver
from oslo_config import cfg
from oslo_log import log as logging
from oslo_service import loopingcall
from oslo_utils import excutils

from api_ext.nova_agent import (
    AgentCallFailed,
    AgentDelegate,
    NovaSideEndpoint,
    RefreshRefused,
)
from hostagent.rpc import client as agent_client
from hostagent.rpc import nova_side

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
DRIVER_NAME = "qsnap.QsnapLibvirtDriver"

qsnap_group = cfg.OptGroup("qsnap", title="qsnap agent", help="qsnap's driver in nova-compute.")
qsnap_opts = [
    cfg.StrOpt(
        "transport_url",
        secret=True,
        help="oslo.messaging URL of the qsnap agent's bus; unset: [DEFAULT] transport_url.",
    ),
    cfg.StrOpt("agent_host", help="The qsnap agent's [DEFAULT] host; unset: [DEFAULT] host."),
    cfg.StrOpt(
        "control_exchange",
        default="openstack",
        help="The qsnap agent's [DEFAULT] control_exchange (Nova's own is 'nova'): both the "
        "agent's RPC and this driver's refresh endpoint use it.",
    ),
    cfg.FloatOpt(
        "rpc_timeout", default=30.0, min=1.0, max=60.0, help="Seconds per call to the agent."
    ),
    cfg.FloatOpt(
        "create_timeout",
        default=660.0,
        min=1.0,
        max=3600.0,
        help="Seconds to wait for the agent's snapshot create. Keep it above the agent's "
        "[agent] create_deadline (600, Cinder's own wait): the agent never starts a snapshot "
        "after that, so the driver always sees the outcome; giving up earlier could report "
        "'error' for a snapshot the agent then takes, a live layer Cinder never recorded.",
    ),
    cfg.FloatOpt(
        "delete_timeout",
        default=7000.0,
        min=1.0,
        max=7080.0,
        help="Seconds to wait for the agent's snapshot merge (Cinder gives up at 7200).",
    ),
    cfg.FloatOpt(
        "poll_interval", default=1.0, min=0.1, max=10.0, help="Seconds between status polls."
    ),
]
CONF.register_group(qsnap_group)
CONF.register_opts(qsnap_opts, group=qsnap_group)


def list_opts() -> list[tuple[cfg.OptGroup, list[cfg.Opt]]]:
    return [(qsnap_group, qsnap_opts)]


def _agent_ctxt(context: Any) -> dict[str, Any]:
    """What the agent journals of Nova's request (no token crosses to the agent's bus)."""
    return {
        "request_id": context.request_id,
        "user_id": context.user_id,
        "project_id": context.project_id,
    }


class QsnapLibvirtDriver(libvirt_driver.LibvirtDriver):  # type: ignore[misc]
    """Stock libvirt driver whose assisted volume snapshots are done by the qsnap agent."""

    _qsnap_transport: Any = None
    _qsnap_server: Any = None
    _qsnap_agent: AgentDelegate | None = None

    def init_host(self, host: str) -> None:
        super().init_host(host)
        opts = CONF.qsnap
        agent_host = opts.agent_host or CONF.host
        transport = agent_client.get_transport(CONF, opts.transport_url)
        self._qsnap_transport = transport
        api = agent_client.AgentAPI(
            transport, agent_host, timeout=opts.rpc_timeout, exchange=opts.control_exchange
        )
        self._qsnap_agent = AgentDelegate(
            api,
            create_timeout=opts.create_timeout,
            delete_timeout=opts.delete_timeout,
            poll_interval=opts.poll_interval,
        )
        target = om.Target(
            exchange=opts.control_exchange,
            topic=nova_side.TOPIC,
            server=agent_host,
            version=nova_side.VERSION,
        )
        endpoint = NovaSideEndpoint(CONF.host, DRIVER_NAME, _BdmRefresher(self))
        self._qsnap_server = om.get_rpc_server(
            transport,
            target,
            [endpoint],
            # as nova.rpc.get_server: the executor of Nova's concurrency mode
            executor="threading" if utils.concurrency_mode_threading() else "eventlet",
            access_policy=om.DefaultRPCAccessPolicy,
        )
        self._qsnap_server.start()
        LOG.info("qsnap: agent host %s; BDM refresh endpoint on topic %s", agent_host, target.topic)

    def cleanup_host(self, host: str) -> None:
        server, self._qsnap_server = self._qsnap_server, None
        if server is not None:
            server.stop()
            server.wait()
        transport, self._qsnap_transport = self._qsnap_transport, None
        if transport is not None:
            transport.cleanup()
        super().cleanup_host(host)

    def _qsnap(self) -> AgentDelegate:
        if self._qsnap_agent is None:
            raise exception.InternalError(_("qsnap driver used before init_host"))
        return self._qsnap_agent

    def volume_snapshot_create(
        self, context: Any, instance: Any, volume_id: str, create_info: dict[str, Any]
    ) -> None:
        """Stock Nova's create with the agent as the hypervisor step (no guest XML here)."""
        LOG.debug("volume_snapshot_create: create_info: %s", create_info, instance=instance)
        try:
            self._host.get_guest(instance)
        except exception.InstanceNotFound as exc:
            raise exception.InstanceNotRunning(instance_id=instance.uuid) from exc
        if create_info.get("type") != "qcow2":
            raise exception.InternalError(_("Unknown type: %s") % create_info.get("type"))
        snapshot_id = create_info.get("snapshot_id")
        if snapshot_id is None:
            raise exception.InternalError(_("snapshot_id required in create_info"))

        try:
            op = self._qsnap().create(_agent_ctxt(context), volume_id, create_info)
        except Exception as exc:
            with excutils.save_and_reraise_exception():
                _log_failure("volume_snapshot_create", snapshot_id, "error", exc, instance)
                self._volume_snapshot_update_status(context, snapshot_id, "error")
        LOG.info(
            "qsnap: snapshot %s created by operation %s", snapshot_id, op.id, instance=instance
        )
        self._volume_snapshot_update_status(context, snapshot_id, "creating")

        def _wait_for_snapshot() -> None:  # stock Nova's: Cinder leaves 'creating' when done
            snapshot = self._volume_api.get_snapshot(context, snapshot_id)
            if snapshot.get("status") != "creating":
                self._volume_refresh_connection_info(context, instance, volume_id)
                raise loopingcall.LoopingCallDone()

        timer = loopingcall.FixedIntervalLoopingCall(_wait_for_snapshot)
        timer.start(interval=0.5).wait()

    def volume_snapshot_delete(
        self,
        context: Any,
        instance: Any,
        volume_id: str,
        snapshot_id: str,
        delete_info: dict[str, Any],
    ) -> None:
        """Stock Nova's delete with the agent as the hypervisor step (the merge)."""
        LOG.debug("volume_snapshot_delete: delete_info: %s", delete_info, instance=instance)
        try:
            if delete_info.get("type") != "qcow2":
                msg = _("Unknown delete_info type %s") % delete_info.get("type")
                raise exception.InternalError(msg)
            try:
                self._host.get_guest(instance)
            except exception.InstanceNotFound as exc:
                raise exception.InstanceNotRunning(instance_id=instance.uuid) from exc
            op = self._qsnap().delete(_agent_ctxt(context), volume_id, snapshot_id, delete_info)
        except Exception as exc:
            with excutils.save_and_reraise_exception():
                _log_failure("volume_snapshot_delete", snapshot_id, "error_deleting", exc, instance)
                self._volume_snapshot_update_status(context, snapshot_id, "error_deleting")
        LOG.info("qsnap: snapshot %s merged by operation %s", snapshot_id, op.id, instance=instance)
        self._volume_snapshot_update_status(context, snapshot_id, "deleting")
        self._volume_refresh_connection_info(context, instance, volume_id)


def _log_failure(method: str, snapshot_id: str, status: str, exc: Exception, instance: Any) -> None:
    """The agent's own message for its errors; a traceback only for unexpected ones."""
    if isinstance(exc, (AgentCallFailed, exception.InstanceNotRunning, exception.InternalError)):
        LOG.error(
            "%s of snapshot %s failed, sending %s to Cinder: %s",
            method,
            snapshot_id,
            status,
            exc,
            instance=instance,
        )
    else:
        LOG.exception(
            "Error occurred during %s of snapshot %s, sending %s to Cinder.",
            method,
            snapshot_id,
            status,
            instance=instance,
        )


class _BdmRefresher:
    """Nova's part of ``refresh_volume``: stock ``_volume_refresh_connection_info``."""

    def __init__(self, driver: QsnapLibvirtDriver) -> None:
        self._driver = driver

    def refresh(self, instance_uuid: str, volume_id: str) -> object:
        try:
            instance = objects.Instance.get_by_uuid(nova_context.get_admin_context(), instance_uuid)
        except exception.InstanceNotFound as exc:
            raise RefreshRefused(f"instance {instance_uuid} not found") from exc
        if instance.host != CONF.host:
            raise RefreshRefused(
                f"instance {instance_uuid} is on host {instance.host!r}, not {CONF.host!r}"
            )
        # An admin context without a token uses [cinder]'s auth; the instance's project_id
        # fills a [cinder] endpoint_template's %(project_id)s (None would ask /v3/None).
        ctxt = nova_context.RequestContext(
            project_id=instance.project_id, is_admin=True, overwrite=False
        )
        try:
            self._driver._volume_refresh_connection_info(ctxt, instance, volume_id)
            bdm = objects.BlockDeviceMapping.get_by_volume_and_instance(
                ctxt, volume_id, instance_uuid
            )
        except exception.VolumeBDMNotFound as exc:
            raise RefreshRefused(
                f"volume {volume_id} is not attached to instance {instance_uuid}"
            ) from exc
        return bdm.connection_info
