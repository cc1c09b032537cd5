"""The nova-free half of qsnap's driver in nova-compute (``api_ext.nova_driver`` wires it).

- :class:`AgentDelegate`: Nova's assisted snapshot create/delete handed to the local agent
  (which journals, checks Cinder's ``.info`` ledger, quiesces, snapshots or merges, and
  recovers after a crash). The agent answers with an operation at once; the delegate polls it
  until it ends, because stock Nova reports to Cinder only once the hypervisor work is done.
  ``reporter = nova``: the agent posts nothing to Cinder, Nova's driver does (one reporter).
- :class:`NovaSideEndpoint`: the server side of :class:`hostagent.rpc.nova_side.NovaSideAPI`,
  which the agent calls after chain changes it makes by itself. It takes no file name from the
  agent: Nova re-reads Cinder's attachment into the BDM and answers what the BDM now holds.

Both raise errors whose message is what an operator needs in nova-compute's log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hostagent.rpc import contract as api
from hostagent.rpc.client import om
from hostagent.rpc.nova_side import VERSION as NOVA_SIDE_VERSION
from qcow2.naming import is_uuid

LOG = logging.getLogger(__name__)

#: States after which an operation never changes again.
TERMINAL = frozenset(
    {api.OperationState.SUCCEEDED, api.OperationState.FAILED, api.OperationState.CANCELLED}
)


class AgentCallFailed(Exception):
    """The agent did not do what Nova asked; Nova's driver reports 'error'/'error_deleting'."""


class AgentRefused(AgentCallFailed):
    """The agent refused the request or did not answer it: no operation was started."""


class AgentOperationFailed(AgentCallFailed):
    """The agent's operation failed, was cancelled, or did not end in time."""

    def __init__(self, op_id: str, state: str, detail: str) -> None:
        super().__init__(f"qsnap agent operation {op_id} {state}: {detail}")
        self.op_id, self.state, self.detail = op_id, state, detail


class AgentLike(Protocol):
    """The part of :class:`hostagent.rpc.client.AgentAPI` the delegate uses."""

    def create_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        create_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = ...,
    ) -> api.Operation: ...

    def delete_assisted_snapshot(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
        *,
        reporter: api.Reporter = ...,
    ) -> api.Operation: ...

    def get_operation(self, ctxt: Mapping[str, Any], op_id: str) -> api.Operation: ...


class AgentDelegate:
    """Runs one assisted create/delete on the agent and waits, bounded, for its outcome.

    The bounds must stay below Cinder's own waits (600 s for a create, 7200 s for a delete):
    past them Cinder has given up and our report would land on a snapshot already failed.
    A timeout does not stop the agent (snapshot operations are not cancellable; the agent
    journals and finishes them); the error names the operation so it can be looked up.
    """

    def __init__(
        self,
        agent: AgentLike,
        *,
        create_timeout: float,
        delete_timeout: float,
        poll_interval: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agent = agent
        self._create_timeout, self._delete_timeout = create_timeout, delete_timeout
        self._poll, self._sleep, self._clock = poll_interval, sleep, clock

    def create(
        self, ctxt: Mapping[str, Any], volume_id: str, create_info: Mapping[str, Any]
    ) -> api.Operation:
        """The succeeded operation of Nova's ``volume_snapshot_create``; raises otherwise."""
        return self._run(
            ctxt,
            "create_assisted_snapshot",
            lambda: self._agent.create_assisted_snapshot(
                ctxt, volume_id, create_info, reporter=api.Reporter.NOVA
            ),
            self._create_timeout,
        )

    def delete(
        self,
        ctxt: Mapping[str, Any],
        volume_id: str,
        snapshot_id: str,
        delete_info: Mapping[str, Any],
    ) -> api.Operation:
        """The succeeded operation of Nova's ``volume_snapshot_delete``; raises otherwise."""
        return self._run(
            ctxt,
            "delete_assisted_snapshot",
            lambda: self._agent.delete_assisted_snapshot(
                ctxt, volume_id, snapshot_id, delete_info, reporter=api.Reporter.NOVA
            ),
            self._delete_timeout,
        )

    def _run(
        self,
        ctxt: Mapping[str, Any],
        method: str,
        start: Callable[[], api.Operation],
        timeout: float,
    ) -> api.Operation:
        deadline = self._clock() + timeout
        try:
            op = start()
        except api.AgentRpcError as exc:
            raise AgentRefused(f"qsnap agent refused {method}: {_name(exc)}: {exc}") from exc
        except om.MessagingTimeout as exc:
            raise AgentRefused(
                f"qsnap agent did not answer {method} within the RPC timeout "
                "(is qsnap-agent running on this host?)"
            ) from exc
        except om.MessagingException as exc:
            raise AgentRefused(f"qsnap agent could not be asked {method}: {exc}") from exc
        LOG.info("qsnap agent accepted %s as operation %s", method, op.id)
        return self._wait(ctxt, op, deadline, timeout)

    def _wait(
        self, ctxt: Mapping[str, Any], op: api.Operation, deadline: float, timeout: float
    ) -> api.Operation:
        while op.state not in TERMINAL:
            left = deadline - self._clock()
            if left <= 0:
                raise AgentOperationFailed(
                    op.id,
                    f"still {op.state.value}",
                    f"did not end within {timeout:g} s; the agent finishes it on its own "
                    "(look it up with 'qsnap operation show')",
                )
            self._sleep(min(self._poll, left))
            try:
                op = self._agent.get_operation(ctxt, op.id)
            except om.MessagingTimeout:
                LOG.warning("qsnap agent did not answer get_operation(%s); asking again", op.id)
            except (api.AgentRpcError, om.MessagingException) as exc:
                raise AgentOperationFailed(
                    op.id, "unknown", f"get_operation failed: {_name(exc)}: {exc}"
                ) from exc
        if op.state is api.OperationState.SUCCEEDED:
            return op
        err = op.error or {}
        detail = f"{err.get('code', 'no error code')}: {err.get('message', 'no message')}"
        raise AgentOperationFailed(op.id, op.state.value, detail)


def _name(exc: BaseException) -> str:
    """The agent's error class name (oslo.messaging appends ``_Remote`` to rebuilt ones)."""
    return type(exc).__name__.removesuffix("_Remote")


# -- the endpoint the agent calls -------------------------------------------------------
class RefreshRefused(Exception):
    """A refresh Nova's side will not do, or whose result names no file: the message says why."""


class BdmRefresher(Protocol):
    """Nova's part of a refresh (in ``nova_driver``): the BDM's connection_info afterwards."""

    def refresh(self, instance_uuid: str, volume_id: str) -> object:
        """Re-read Cinder's attachment into the BDM of ``volume_id`` on ``instance_uuid``.

        Returns the BDM's ``connection_info`` (JSON text as Nova stores it, or a mapping);
        raises :class:`RefreshRefused` for an instance not on this host or a volume not
        attached to it.
        """
        ...


def check_uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_uuid(value):
        raise RefreshRefused(f"{what} must be a lower-case UUID, got {value!r}")
    return value


def bdm_state(connection_info: object, instance_uuid: str, volume_id: str) -> dict[str, str]:
    """``{"name", "format"}`` of a BDM's ``connection_info['data']`` (what a reboot opens)."""
    where = f"volume {volume_id} of instance {instance_uuid}"
    info: object = connection_info
    if isinstance(info, str | bytes):
        try:
            info = json.loads(info)
        except ValueError as exc:
            raise RefreshRefused(f"the BDM of {where} holds unreadable connection_info") from exc
    if not info:
        raise RefreshRefused(f"the BDM of {where} has no connection_info (not connected?)")
    data = info.get("data") if isinstance(info, Mapping) else None
    name = data.get("name") if isinstance(data, Mapping) else None
    fmt = data.get("format") if isinstance(data, Mapping) else None
    if not isinstance(name, str) or not name or not isinstance(fmt, str) or not fmt:
        raise RefreshRefused(
            f"the BDM of {where} names no file and format (not a file-backed NFS/GlusterFS "
            f"volume?): data = {data!r}"
        )
    return {"name": name, "format": fmt}


class NovaSideEndpoint:
    """RPC 1.0 of :mod:`hostagent.rpc.nova_side`, served inside nova-compute."""

    target = om.Target(version=NOVA_SIDE_VERSION)

    def __init__(self, host: str, driver_name: str, refresher: BdmRefresher) -> None:
        self._host, self._driver, self._refresher = host, driver_name, refresher

    def ping(self, ctxt: Mapping[str, Any]) -> dict[str, str]:
        return {"host": self._host, "driver": self._driver}

    def refresh_volume(
        self, ctxt: Mapping[str, Any], instance_uuid: object, volume_id: object
    ) -> dict[str, str]:
        try:
            inst = check_uuid(instance_uuid, "instance_uuid")
            vol = check_uuid(volume_id, "volume_id")
            state = bdm_state(self._refresher.refresh(inst, vol), inst, vol)
        except RefreshRefused as exc:
            LOG.warning("qsnap: refresh_volume refused: %s", exc)
            # ExpectedException records the current exc_info: no traceback in the log, and
            # the agent gets "RefreshRefused: <message>".
            raise om.ExpectedException() from exc
        LOG.info(
            "qsnap: refreshed the BDM of volume %s on instance %s from Cinder: %s (%s)",
            vol,
            inst,
            state["name"],
            state["format"],
        )
        return state
