"""Assembly of the real agent: config, libvirt, journal, Cinder notifier, RPC server.

Everything long-lived is built here and nowhere else, so the service itself stays a plain
object over injected parts (faked in unit tests). SIGTERM/SIGINT stop the RPC server first
(no new work), then the pool drains, then notices and libvirt are closed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from hostagent._notify_queue import NotifyQueue
from hostagent._pool import KeyedPool
from hostagent.cinder_meta import CinderMeta
from hostagent.config import make_conf
from hostagent.hypervisor import LibvirtHypervisor
from hostagent.inventory import InventoryTracker
from hostagent.journal import Journal
from hostagent.notifier import (
    AuthSettings,
    CinderNotifier,
    NoAuthSettings,
    NoneAuthSettings,
    PasswordSettings,
    RetryPolicy,
)
from hostagent.recovery import reconcile
from hostagent.rpc_server import serve
from hostagent.rpcapi import InventoryFanout, get_transport
from hostagent.service import AssistedService
from libvirt_ops import Connection

LOG = logging.getLogger(__name__)


def cinder_auth(conf: Any) -> AuthSettings:
    """The notifier's auth from the [cinder] group."""
    c = conf.cinder
    if c.auth_type == "noauth":
        if not (c.endpoint and c.project_id):
            raise ValueError("[cinder] noauth needs endpoint and project_id")
        return NoAuthSettings(c.endpoint, c.project_id, c.user_id or "qsnap")
    if c.auth_type == "none":
        if not c.endpoint:
            raise ValueError("[cinder] auth_type=none needs endpoint")
        return NoneAuthSettings(c.endpoint)
    return PasswordSettings(
        c.auth_url, c.username, c.password, c.project_name, c.user_domain_name,
        c.project_domain_name, c.region_name,
    )  # fmt: skip


def main(config_files: Sequence[str], *, ready: Callable[[], None] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    conf = make_conf(config_files=config_files)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.makedirs(conf.state_path, mode=0o700, exist_ok=True)
    roots = list(conf.shares.allowed_roots)
    conn = Connection(conf.libvirt.uri, open_timeout=conf.libvirt.open_timeout)
    journal = Journal(os.path.join(conf.state_path, "journal.sqlite"), host=conf.host)
    retry = RetryPolicy(deadline=30.0, request_timeout=conf.cinder.timeout)
    meta = CinderMeta(cinder_auth(conf), retry) if conf.cinder.enabled else None
    queue = NotifyQueue(journal, CinderNotifier(cinder_auth(conf), retry), meta=meta)
    pool = KeyedPool(conf.agent.workers)
    hv = LibvirtHypervisor(
        conn,
        conf.host,
        roots=roots,
        freeze=conf.agent.freeze_timeout,
        merge=conf.agent.merge_timeout,
    )
    service = AssistedService(journal, hv, queue, pool, roots=roots)
    transport = get_transport(conf)
    tracker = InventoryTracker(
        conn, conf.host, InventoryFanout(transport), interval=conf.agent.inventory_interval
    )
    # before any request is served and before the queue's first pass delivers what it owes
    reconcile(
        journal, hv, queue, submit=pool.submit, roots=roots, job_timeout=conf.agent.merge_timeout,
        owned=service.owned,
    )  # fmt: skip
    queue.start()  # resends what an earlier run left pending
    tracker.start()
    try:
        serve(conf, service, ready=ready or (lambda: LOG.info("qsnap-agent %s ready", conf.host)))
    finally:
        pool.shutdown(wait=True)
        tracker.stop()
        queue.stop()
        transport.cleanup()
        journal.close()
        conn.close()
    return 0
