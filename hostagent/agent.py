"""Assembly of the real agent: config, libvirt, journal, Cinder notifier, RPC server.

Everything long-lived is built here and nowhere else, so the service itself stays a plain
object over injected parts (faked in unit tests). :class:`Agent` is the whole daemon as an
object, so ``make demo`` and tests can run it inside their own process (one ``fake://``
transport shared with an in-process API); :func:`main` is that object plus signals and
oslo.log. Stopping takes the RPC server down first (no new work), then the pool drains, then
notices, notifications and libvirt are closed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from oslo_config import cfg
from oslo_log import log as oslo_log

from hostagent.backup.legacy import release_legacy
from hostagent.backup.online import recover_backup
from hostagent.backup.service import BackupSettings, LiveEngine
from hostagent.cinder.outbox import NoCinder, NotifyQueue
from hostagent.cinder.records import CinderMeta
from hostagent.cinder.status import (
    AuthSettings,
    CinderNotifier,
    NoAuthSettings,
    NoneAuthSettings,
    PasswordSettings,
    RetryPolicy,
)
from hostagent.config import make_conf
from hostagent.inventory import InventoryTracker
from hostagent.journal.events import make_events
from hostagent.journal.purge import DAY, JournalPurger
from hostagent.journal.store import Journal
from hostagent.libvirt_hypervisor import LibvirtHypervisor
from hostagent.nova_records import NovaRecords
from hostagent.pool import KeyedPool
from hostagent.recovery import reconcile
from hostagent.rpc.client import InventoryFanout, get_transport
from hostagent.rpc.nova_side import NovaSideAPI
from hostagent.rpc.server import get_server
from hostagent.service import AssistedService
from hostagent.snapshots.assisted_rules import Deadlines
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


class Agent:
    """One host's agent, built from ``conf``; :meth:`start` serves, :meth:`stop` drains.

    ``transport`` (RPC and inventory) and ``notification_transport`` may be given to share
    them with other parts of one process; the agent then leaves their cleanup to the caller.
    """

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        *,
        transport: Any = None,
        notification_transport: Any = None,
    ) -> None:
        self.conf = conf
        self.host: str = conf.host
        os.makedirs(conf.state_path, mode=0o700, exist_ok=True)
        roots = list(conf.shares.allowed_roots)
        self._roots = roots
        self._owned: list[Any] = []
        self.events, made = make_events(conf, transport=notification_transport)
        if made is not None:
            self._owned.append(made)
        self.connection = conn = Connection(
            conf.libvirt.uri, open_timeout=conf.libvirt.open_timeout
        )
        journal = Journal(
            os.path.join(conf.state_path, "journal.sqlite"), host=conf.host, listener=self.events
        )
        self.journal = journal
        self.purger = JournalPurger(
            journal, age=conf.journal.purge_age_days * DAY, interval=conf.journal.purge_interval
        )
        retry = RetryPolicy(deadline=30.0, request_timeout=conf.cinder.timeout)
        if conf.cinder.enabled:
            auth = cinder_auth(conf)
            queue = NotifyQueue(journal, CinderNotifier(auth, retry), meta=CinderMeta(auth, retry))
        else:  # no volume service: ledgers are kept, no Cinder call is made
            queue = NotifyQueue(journal, NoCinder())
        self.queue = queue
        pool = KeyedPool(conf.agent.workers)
        self.pool = pool
        #: Cinder-driven creates/deletes: their own capacity (backups cannot starve them).
        self.cinder_pool = KeyedPool(conf.agent.cinder_workers, name="qsnap-cinder")
        hv = LibvirtHypervisor(
            conn,
            conf.host,
            roots=roots,
            freeze=conf.agent.freeze_timeout,
            merge=conf.agent.merge_timeout,
        )
        self.hypervisor = hv
        b = conf.backup
        backup_settings = BackupSettings(
            repository=os.path.abspath(b.repository or os.path.join(conf.state_path, "backups")),
            zstd_level=b.zstd_level,
            chunk_size=b.chunk_size_mib << 20,
            max_parallel=b.max_parallel,
            keep_last=b.keep_last,
            restore_dir=b.restore_dir,
            bandwidth_mib=b.bandwidth_mib,
            create_repository=not b.repository or b.create_repository,
        )
        if transport is None:
            transport = get_transport(conf)
            self._owned.append(transport)
        self.transport = transport
        service = AssistedService(
            journal,
            hv,
            queue,
            pool,
            roots=roots,
            backup_engine=LiveEngine(hv, journal, roots),
            backup_settings=backup_settings,
            cinder_pool=self.cinder_pool,
            deadlines=Deadlines(
                create=conf.agent.create_deadline,
                delete=conf.agent.delete_deadline,
                create_reserve=conf.agent.freeze_timeout + 5.0,
            ),
            nova=self._nova_records(conf, transport),
        )
        self.service = service
        self.tracker = InventoryTracker(
            conn,
            conf.host,
            InventoryFanout(transport),
            interval=conf.agent.inventory_interval,
        )
        self._server: Any = None

    def _nova_records(self, conf: cfg.ConfigOpts, transport: Any) -> NovaRecords:
        """Nova's side on its transport ([nova] transport_url, else the agent's own)."""
        n = conf.nova
        if not n.enabled:
            return NovaRecords()
        if n.transport_url:
            transport = get_transport(conf, n.transport_url)
            self._owned.append(transport)
        side = NovaSideAPI(transport, conf.host, timeout=n.refresh_timeout)
        return NovaRecords(side, ping_timeout=n.ping_timeout)

    def start(self) -> None:
        """Reconcile unfinished work, then start the queue, purge, tracker and RPC threads."""
        if self.events is not None:
            self.events.start()
        # an earlier qsnap's checkpoint overlays, once, before any chain is judged
        legacy = release_legacy(self.journal, self.connection, self._roots)
        if legacy is not None:
            LOG.info("legacy checkpoint overlays: %s", legacy)
        # before any request is served and before the queue's first pass delivers what it owes
        resumers = self.service.resumers(
            job_timeout=self.conf.agent.merge_timeout,
            recover_volume=lambda rec: recover_backup(self.journal, rec),
        )
        reconcile(self.journal, resumers)
        self.queue.start()  # resends what an earlier run left pending
        self.purger.start()  # after recovery: it finished what it could
        self.tracker.start()
        self._server = get_server(self.transport, self.host, self.service)
        self._server.start()
        LOG.info("qsnap-agent %s serving", self.host)

    def stop(self) -> None:
        """Stop taking requests, finish running operations, close everything it owns."""
        if self._server is not None:
            self._server.stop()
            self._server.wait()
            self._server = None
        self.cinder_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.tracker.stop()
        self.queue.stop()
        self.purger.stop()
        if self.events is not None:
            self.events.stop()
        for transport in self._owned:
            transport.cleanup()
        self._owned.clear()
        self.journal.close()
        self.connection.close()

    def __enter__(self) -> Agent:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(
    argv: Sequence[str] = (),
    *,
    config_files: Sequence[str] | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run the agent until SIGTERM/SIGINT; ``argv`` are oslo.config/oslo.log options."""
    conf = make_conf(argv, config_files=config_files)
    if ready is not None:  # stdout carries the ready line: console logs go to stderr
        conf.set_override("use_stderr", True)
    oslo_log.setup(conf, "qsnap")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(conf)
    try:
        agent.start()
        (ready or (lambda: LOG.info("qsnap-agent %s ready", conf.host)))()
        while not stop.wait(1.0):  # a timed wait lets the signal handler run promptly
            pass
    finally:
        agent.stop()
    return 0
