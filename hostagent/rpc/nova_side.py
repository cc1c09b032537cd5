"""The agent's contract with qsnap's part inside nova-compute (``api_ext.nova_driver``).

A hard reboot, a power-on or a live migration rebuilds a guest's disks from Nova's block-device
mapping (BDM), which stock Nova refreshes only after its own assisted snapshots. So every chain
change the agent makes by itself (instance snapshots, deletes of its own snapshots) ends by
asking Nova's side to refresh the BDM of each changed volume. Nova's side never takes a file
name from the agent: it re-reads Cinder's attachment record (``refresh_connection_info``, as
stock Nova does after a snapshot) and answers what the BDM now holds, which the agent compares
with the live chain. The endpoint listens on the agent's transport, topic :data:`TOPIC`, server
= the agent's ``host``; ``ping`` lets the agent refuse a chain change up front when Nova's side
is not there.

Version 1.0: ``ping() -> {"host", "driver"}``; ``refresh_volume(instance_uuid, volume_id) ->
{"name", "format"}`` (the BDM's ``connection_info.data`` after the refresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hostagent.errors import QsnapAgentError
from hostagent.rpc.messaging import messaging

om = messaging()

TOPIC = "qsnap-nova"
VERSION = "1.0"


class NovaSideError(QsnapAgentError):
    """Nova's side did not answer, or answered with an error (the message says which)."""


@dataclass(frozen=True)
class BdmState:
    """What Nova's BDM names for a volume after a refresh: the file and its format."""

    name: str
    format: str

    @classmethod
    def from_wire(cls, data: object) -> BdmState:
        if not isinstance(data, Mapping):
            raise NovaSideError(f"Nova's side answered {data!r}, not a mapping")
        name, fmt = data.get("name"), data.get("format")
        if not isinstance(name, str) or not isinstance(fmt, str):
            raise NovaSideError(f"Nova's side answered {dict(data)!r}: no name/format")
        return cls(name, fmt)

    def to_wire(self) -> dict[str, str]:
        return {"name": self.name, "format": self.format}


class NovaSideAPI:
    """Client of the endpoint in nova-compute on the agent's own host."""

    def __init__(self, transport: Any, host: str, *, timeout: float = 30.0) -> None:
        target = om.Target(topic=TOPIC, version=VERSION, server=host)
        self.host = host
        self._client = om.get_rpc_client(transport, target, timeout=timeout)

    def _call(self, method: str, timeout: float | None = None, **kwargs: Any) -> Any:
        cctxt = self._client.prepare(timeout=timeout) if timeout else self._client
        try:
            return cctxt.call({}, method, **kwargs)
        except om.MessagingTimeout as exc:
            raise NovaSideError(
                f"Nova's side (topic {TOPIC}, server {self.host}) did not answer {method}: "
                "is nova-compute running with compute_driver = qsnap.QsnapLibvirtDriver?"
            ) from exc
        except om.RemoteError as exc:
            raise NovaSideError(
                f"Nova's side failed {method}: {exc.exc_type}: {exc.value}"
            ) from exc
        except om.MessagingException as exc:
            raise NovaSideError(f"Nova's side unreachable for {method}: {exc}") from exc

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        out = self._call("ping", timeout)
        if not isinstance(out, dict):
            raise NovaSideError(f"Nova's side answered ping with {out!r}")
        return out

    def refresh_volume(self, instance_uuid: str, volume_id: str) -> BdmState:
        out = self._call("refresh_volume", instance_uuid=instance_uuid, volume_id=volume_id)
        return BdmState.from_wire(out)
