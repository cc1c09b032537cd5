"""Which host's agent has a volume (or instance): the agents' inventory, heard by fanout.

Every agent casts ``inventory_update(host, volumes, generation)`` on the fanout topic
``qsnap-inventory`` on change and periodically; this process keeps the newest per host.
``generation`` grows per change, so older updates are dropped, except a generation of 0 or 1,
which is what a restarted agent sends first. A volume no update names yet is looked up by
asking the ``[api] hosts`` agents directly (``get_inventory``); still unknown -> not routed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hostagent.rpc import contract as api
from hostagent.rpc.client import INVENTORY_TOPIC, om

LOG = logging.getLogger(__name__)


class NotRouted(LookupError):
    """No known agent has this volume or instance attached (the API answers 404)."""


@dataclass(frozen=True)
class _HostView:
    generation: int
    volumes: frozenset[str]
    instances: frozenset[str]


class Router:
    """Thread-safe map volume/instance -> host, fed by inventory updates and probes."""

    def __init__(
        self,
        static_hosts: Sequence[str] = (),
        probe: Callable[[str], api.Inventory] | None = None,
    ) -> None:
        self._static = tuple(static_hosts)
        self._probe = probe
        self._hosts: dict[str, _HostView] = {}
        self._lock = threading.Lock()

    def update(
        self,
        host: str,
        volumes: Iterable[Mapping[str, Any]],
        generation: int,
        *,
        probed: bool = False,
    ) -> bool:
        """Record one host's inventory; False when it was stale and dropped.

        A probed inventory never replaces a newer published one (no restart exception:
        a probe answering generation 1 is not news if generation 2 was heard already).
        """
        vols = list(volumes)
        view = _HostView(
            generation,
            frozenset(str(v["volume_id"]).lower() for v in vols),
            frozenset(str(v["instance_uuid"]).lower() for v in vols),
        )
        with self._lock:
            old = self._hosts.get(host)
            restart = generation <= 1 and not probed
            if old is not None and generation < old.generation and not restart:
                return False
            self._hosts[host] = view
        return True

    def known_hosts(self) -> list[str]:
        with self._lock:
            return sorted(set(self._hosts) | set(self._static))

    def _find(self, key: str, instance: bool) -> str | None:
        with self._lock:
            for host, view in sorted(self._hosts.items()):
                if key in (view.instances if instance else view.volumes):
                    return host
        return None

    def _lookup(self, key: str, instance: bool) -> str:
        key = key.lower()
        host = self._find(key, instance)
        if host is None and self._probe is not None:
            for static in self._static:
                try:
                    inv = self._probe(static)
                except Exception as exc:  # an unreachable host must not hide the others
                    LOG.warning("inventory probe of host %s failed: %s", static, exc)
                    continue
                self.update(inv.host, (vars(v) for v in inv.volumes), inv.generation, probed=True)
            host = self._find(key, instance)
        if host is None:
            what = "instance" if instance else "volume"
            raise NotRouted(f"{what} {key} is not attached on any known host")
        return host

    def host_for_volume(self, volume_id: str) -> str:
        return self._lookup(volume_id, instance=False)

    def host_for_instance(self, instance_uuid: str) -> str:
        return self._lookup(instance_uuid, instance=True)


class _InventoryEndpoint:
    target = om.Target(version="1.0")

    def __init__(self, router: Router) -> None:
        self._router = router

    def inventory_update(
        self, ctxt: Any, host: str, volumes: list[dict[str, Any]], generation: int
    ) -> None:
        if not self._router.update(host, volumes, generation):
            LOG.debug("dropped stale inventory generation %d of %s", generation, host)


class InventoryListener:
    """An RPC server on the fanout topic feeding ``router``; start() / stop()."""

    def __init__(self, transport: Any, router: Router) -> None:
        name = f"qsnap-api-{socket.gethostname()}-{os.getpid()}"
        self._server = om.get_rpc_server(
            transport,
            om.Target(topic=INVENTORY_TOPIC, server=name),
            [_InventoryEndpoint(router)],
            executor="threading",
        )

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._server.wait()
