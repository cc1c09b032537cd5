"""What the hostagent unit tests share: ONE fake :class:`~hostagent.hypervisor.Hypervisor`,
Cinder's two clients, a backup engine, the agent assembled over them, and image helpers.

Files are real (``qemu-img``): a merge rewrites the qcow2 headers (``rebase -u``) as QEMU
would, so the services' whole-chain inspection sees what libvirt reports. A crash is a
:class:`Crash` raised at a journal crash point (:func:`crash_at`), like kill -9; a fresh
:class:`Agent` on the same journal file is the restarted agent.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import libvirt_ops as lo
from hostagent.backup import repo as bk
from hostagent.backup.service import BackupEngine, BackupSettings
from hostagent.cinder.outbox import NotifyQueue
from hostagent.cinder.records import ActiveFile, MetaAction, MetaError
from hostagent.cinder.status import NotifyUnreachable, Report, Reported
from hostagent.hypervisor import Hypervisor, Located
from hostagent.journal import crash as crash_mod
from hostagent.journal.store import Journal
from hostagent.nova_records import NovaRecords
from hostagent.pool import KeyedPool
from hostagent.recovery import Outcome, reconcile
from hostagent.rpc import contract as api
from hostagent.rpc.messaging import messaging
from hostagent.service import AssistedService
from hostagent.snapshots.assisted import expected_after
from hostagent.snapshots.assisted_rules import Deadlines
from qcow2 import Ledger, inspect_chain, read_ledger, write_ledger

VOL = "0b5e0a52-1c1b-4a7e-9d43-7f0c6f0e2a11"
VOL2 = "1c6f1b63-2d2c-4b8f-8e54-8a1d7a1f3b22"
DOM = "6a1c8b0e-5d2f-4c1e-8f4a-2b3c4d5e6f70"
#: An instance with three volume disks (vdb, vdc, vdd).
VOLS = [
    "1a000000-0000-4000-8000-000000000001",
    "2b000000-0000-4000-8000-000000000002",
    "3c000000-0000-4000-8000-000000000003",
]
CTX = api.CallContext()
MiB = 1 << 20


def make_image(
    path: Path,
    backing: str | None = None,
    size: str | None = "1M",
    *,
    backing_fmt: str = "qcow2",
    pattern: int | None = None,
) -> None:
    """A qcow2 file (on ``backing``, a name relative to its directory, as Cinder makes them);
    ``pattern`` fills its first MiB; ``size=None`` takes the backing file's."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt]
    subprocess.run([*argv, str(path), *([size] if size else [])], check=True)
    if pattern is not None:
        cmd = ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 1M", str(path)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


class Crash(BaseException):
    """Stands in for kill -9: escapes every ``except Exception``."""


def crash_at(mp: pytest.MonkeyPatch, at: str) -> threading.Event:
    """Journal crash point ``at`` (``"step:phase"``) raises :class:`Crash`; set when it did."""
    died = threading.Event()

    def point(step: str, phase: str) -> None:
        if f"{step}:{phase}" == at:
            died.set()
            raise Crash(at)

    mp.setattr(crash_mod, "crash_point", point)
    return died


def no_crash(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(crash_mod, "crash_point", lambda step, phase: None)


def expected(fn: Callable[[], object]) -> BaseException:
    """The exception an RPC endpoint call raised, unwrapped from ``ExpectedException``."""
    with pytest.raises(messaging().ExpectedException) as info:
        fn()
    exc = info.value.exc_info[1]
    assert isinstance(exc, BaseException)
    return exc


class FakeHypervisor:
    """One running domain whose volume disks live in ``directory``; chains top first.

    Every method of the Protocol is modelled:

    - ``snapshot``/``snapshot_disks`` refuse an overlay not backed on the top (as
      ``take_snapshot`` does) and put it on top; ``merge`` (pull/commit/flatten, the chain
      :func:`expected_after` says) and ``merge_owned`` (active commit of the top, commit of
      an inner layer) rewrite the headers of the layers whose backing changed.
    - ``calls`` records ``("snapshot", new_file)``, ``("snapshot", files, quiesce)``,
      ``("merge", to_merge, target)``, ``("merge", volume_id, file, kind)``; with a
      ``gate`` those calls wait until it is set (``running``/``max_running`` count them);
      ``fail`` is raised by them; ``crash_after_snapshot`` raises :class:`Crash` once QEMU
      switched.
    - ``left`` configures ``settle_job`` (the block job a dead agent left, one at a time, on
      the disk asked about): ``"active"`` is an active commit READY until pivoted (the pivot
      pops the top, listed in ``pivoted``), ``"commit"`` a commit that finishes
      ``pending_merge`` when settled, as libvirt_ops' ``settle_block_job`` does both; None:
      ``block_job`` reports a job for ``job_polls`` calls and ``settle_job`` waits for its
      end, bounded by ``timeout`` (a job that cannot be pivoted). ``settles`` records each.
    - ``frozen`` is the guest's freeze state; ``thaw_if_frozen`` counts in ``thawed``.
    - ``nova`` says whether the domain carries Nova's metadata (``nova_managed``).
    """

    def __init__(
        self,
        directory: Path,
        volumes: Sequence[str] = (VOL,),
        *,
        domain: str = DOM,
        size: str = "1M",
    ) -> None:
        """Creates ``directory`` and each volume's base file ``volume-<id>`` if missing."""
        self.dir, self.domain = directory, domain
        directory.mkdir(parents=True, exist_ok=True)
        self.chains: dict[str, list[str]] = {v: [f"volume-{v}"] for v in volumes}
        for v in volumes:
            if not (directory / f"volume-{v}").exists():
                make_image(directory / f"volume-{v}", size=size)
        self.calls: list[tuple[Any, ...]] = []
        self.gate: threading.Event | None = None
        self.running = self.max_running = 0
        self.fail: Exception | None = None
        self.crash_after_snapshot = False
        self.died = threading.Event()
        self.job_polls = 0
        self.left: str | None = None
        self.pending_merge: tuple[str | None, str | None] | None = None
        self.settles: list[dict[str, Any]] = []
        self.pivoted: list[str] = []
        self.frozen = False
        self.thawed = 0
        self.nova = False
        self._lock = threading.Lock()

    @property
    def chain(self) -> list[str]:
        """The first volume's chain (THE chain of a one-volume bed)."""
        return self.chains[next(iter(self.chains))]

    # -- where the disks are ----------------------------------------------------------------
    def _located(self, vid: str) -> Located:
        layers = tuple(
            lo.ChainLayer(str(self.dir / n), "qcow2", None if i == 0 else i)
            for i, n in enumerate(self.chains[vid])
        )
        target = f"vd{'bcdefgh'[list(self.chains).index(vid)]}"
        return Located(self.domain, lo.Disk(target, vid, "virtio", layers))

    def locate(self, volume_id: str) -> Located:
        if volume_id not in self.chains:
            raise api.VolumeNotFound(volume_id)
        return self._located(volume_id)

    def nova_managed(self, domain_uuid: str) -> bool:
        if domain_uuid != self.domain:
            raise api.InstanceNotFound(domain_uuid)
        return self.nova

    def instance_volumes(self, instance_uuid: str) -> list[Located]:
        if instance_uuid != self.domain:
            raise api.InstanceNotFound(instance_uuid)
        return [self._located(v) for v in self.chains]

    def inventory(self) -> api.Inventory:
        return api.Inventory("h", ())

    # -- what the operations do -------------------------------------------------------------
    def _act(self, call: tuple[Any, ...]) -> None:
        with self._lock:
            self.calls.append(call)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
        finally:
            with self._lock:
                self.running -= 1

    def _switch(self, files: Sequence[tuple[str, str]]) -> None:
        for vid, name in files:  # the real take_snapshot refuses overlays not on the top
            with inspect_chain(str(self.dir / name), roots=[str(self.dir)], fmt="qcow2") as c:
                assert c.layers[0].backing_name == self.chains[vid][0]
        if self.fail is not None:
            raise self.fail
        for vid, name in files:
            self.chains[vid].insert(0, name)
        if self.crash_after_snapshot:
            self.died.set()
            raise Crash("killed after QEMU switched, before the journal heard")

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]:
        self._act(("snapshot", new_file))
        vid = str(where.disk.serial)
        self._switch([(vid, new_file)])
        return {"quiesced": False, "chain": list(self.chains[vid])}

    def snapshot_disks(
        self, domain_uuid: str, files: list[tuple[str, str]], quiesce: api.Quiesce
    ) -> dict[str, Any]:
        self._act(("snapshot", tuple(files), quiesce))
        self._switch(files)
        chains = {vid: list(self.chains[vid]) for vid, _ in files}
        return {"quiesced": quiesce is api.Quiesce.REQUIRED, "chains": chains}

    def rewrite(self, vid: str, after: list[str]) -> dict[str, Any]:
        """The chain becomes ``after``: headers whose backing changed are rebased (-u)."""
        before = self.chains[vid]
        was = {n: before[i + 1] if i + 1 < len(before) else None for i, n in enumerate(before)}
        for i, name in enumerate(after):
            backing = after[i + 1] if i + 1 < len(after) else None
            if was[name] != backing:
                fmt = ["-F", "qcow2", "-b", backing] if backing else ["-b", ""]
                argv = ["qemu-img", "rebase", "-u", "-f", "qcow2", *fmt, str(self.dir / name)]
                subprocess.run(argv, check=True)
        gone = [n for n in before if n not in after]
        before[:] = after
        return {"chain_after": list(after), "merged_away": gone}

    def apply_merge(
        self, to_merge: str | None, target: str | None, vid: str | None = None
    ) -> dict[str, Any]:
        """What a finished assisted merge leaves (QEMU ending a job on its own, too)."""
        vid = vid or next(iter(self.chains))
        req = api.DeleteSnapshotRequest(vid, "s", to_merge, target)
        return self.rewrite(vid, expected_after(self.chains[vid], req))

    def merge(
        self,
        where: Located,
        file_to_merge: str | None,
        merge_target_file: str | None,
        progress: Any,
    ) -> dict[str, Any]:
        self._act(("merge", file_to_merge, merge_target_file))
        if self.fail is not None:
            raise self.fail
        progress(5, 10)
        done = self.apply_merge(file_to_merge, merge_target_file, str(where.disk.serial))
        return {"kind": "commit" if merge_target_file else "pull", **done}

    def merge_owned(self, where: Located, file: str, progress: Any) -> dict[str, Any]:
        vid = str(where.disk.serial)
        kind = "active-commit" if self.chains[vid][0] == file else "commit"
        self._act(("merge", vid, file, kind))
        if self.fail is not None:
            raise self.fail
        done = self.rewrite(vid, [n for n in self.chains[vid] if n != file])
        progress(1, 1)
        return {"kind": kind, **done}

    # -- what recovery observes after a restart ---------------------------------------------
    def block_job(self, where: Located) -> dict[str, int]:
        if self.left == "active":
            return {"type": 4, "cur": 5, "end": 5}  # READY: never ends without a pivot
        if self.job_polls > 0:
            self.job_polls -= 1
            return {"type": 3, "cur": 1, "end": 2}
        return {}

    def settle_job(self, where: Located, timeout: float) -> dict[str, Any]:
        vid = str(where.disk.serial)
        found: dict[str, Any] = {"found": None, "pivoted": False}
        if self.left == "active":
            self.pivoted.append(self.chains[vid].pop(0))  # onto the commit base
            found = {"found": "ACTIVE_COMMIT", "pivoted": True}
        elif self.left == "commit" and self.pending_merge is not None:
            self.apply_merge(*self.pending_merge, vid)
            found = {"found": "COMMIT", "pivoted": False}
        elif self.left is None:  # nothing to pivot: waited for, bounded
            deadline, job = time.monotonic() + timeout, self.block_job(where)
            while self.block_job(where):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"block job on {where.key} still running after restart")
                time.sleep(0.2)
            found = {"found": job.get("type") if job else None, "pivoted": False}
        if self.left is not None:
            self.left, self.job_polls = None, 0  # settled: the job is over
        self.settles.append(found)
        return found

    def thaw_if_frozen(self, domain_uuid: str) -> bool:
        was, self.frozen = self.frozen, False
        self.thawed += was
        return was


def _conforms(hv: FakeHypervisor) -> Hypervisor:
    return hv  # mypy checks the fake against the Protocol here


class FakeNotifier:
    """Cinder's snapshot status notifier; the first ``failures`` reports are unreachable;
    ``on_sent`` is Cinder hearing a report (e.g. writing its ledger after ``90%``)."""

    def __init__(
        self, failures: int = 0, on_sent: Callable[[str, Report], None] | None = None
    ) -> None:
        self.failures = failures
        self.sent: list[tuple[str, Report]] = []
        self.on_sent = on_sent

    def _r(self, sid: str, report: Report) -> Reported:
        if self.failures > 0:
            self.failures -= 1
            raise NotifyUnreachable(sid, report, 1, "connection refused")
        self.sent.append((sid, report))
        if self.on_sent is not None:
            self.on_sent(sid, report)
        return Reported(sid, report, 1)

    def report_create_done(self, sid: str) -> Reported:
        return self._r(sid, Report.CREATE_DONE)

    def report_create_failed(self, sid: str) -> Reported:
        return self._r(sid, Report.CREATE_FAILED)

    def report_delete_done(self, sid: str) -> Reported:
        return self._r(sid, Report.DELETE_DONE)

    def report_delete_failed(self, sid: str) -> Reported:
        return self._r(sid, Report.DELETE_FAILED)


class FakeMeta:
    """Cinder's records as the extension keeps them: creating -> available|error, deleted."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.active: dict[str, ActiveFile] = {}  # what a delete said the active file is
        self.fail_create = False
        self.unreachable = 0

    def create(
        self, snapshot_id: str, volume_id: str, description: str, *, checkpoint: bool = False
    ) -> None:
        self.calls.append(("create", snapshot_id))
        if self.fail_create:
            raise MetaError(snapshot_id, "create", "HTTP 409", rejected=True)
        self.records.setdefault(snapshot_id, "creating")

    def apply(self, snapshot_id: str, action: MetaAction, active: ActiveFile | None = None) -> None:
        self.calls.append((action.name, snapshot_id))
        if active is not None:
            self.active[snapshot_id] = active
        if self.unreachable > 0:
            self.unreachable -= 1
            raise MetaError(snapshot_id, action.value, "connection refused", rejected=False)
        if action is MetaAction.DELETE:
            self.records.pop(snapshot_id, None)
        elif snapshot_id in self.records:
            self.records[snapshot_id] = action.name.split("_")[1].lower()


class FakeEngine:
    """Backups offline with the real engine (honouring cancel); ``gate`` blocks each volume
    before it starts, ``hold[vid]`` after it published; ``fail`` volumes end RepositoryFull;
    ``bind`` keeps what the service hands it (its owned checkpoint paths)."""

    def __init__(self, hv: FakeHypervisor, roots: list[str]) -> None:
        self.hv, self.roots = hv, roots
        self.gate: threading.Event | None = None
        self.hold: dict[str, threading.Event] = {}
        self.fail: set[str] = set()
        self.started: list[str] = []
        self.inside = threading.Event()
        self.running = self.max_running = 0
        self.checkpoints: Any = None
        self._lock = threading.Lock()

    def bind(self, checkpoints: Any, step: Any) -> None:
        self.checkpoints = checkpoints

    def backup(
        self, where: Located, incremental: bool, repository: str, progress: Any, cancel: Any
    ) -> dict[str, Any]:
        vid = str(where.disk.serial)
        with self._lock:
            self.started.append(vid)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.inside.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            if vid in self.fail:
                raise bk.RepositoryFull("disk full")
            repo = bk.Repository.open(repository)
            res = bk.backup_full(
                where.disk.source, "qcow2", self.roots, repo, vid, progress=progress, cancel=cancel
            )
            if vid in self.hold:
                assert self.hold[vid].wait(30)
            return {
                "volume_id": vid,
                "backup_id": res.manifest.backup_id,
                "incremental": False,
                "bytes_read": res.bytes_read,
                "bytes_stored": res.bytes_stored,
                "fallback_reason": "no checkpoint" if incremental else None,
            }
        finally:
            with self._lock:
                self.running -= 1


class Agent:
    """One agent 'process' over a bed: journal, notify queue, pool and service."""

    def __init__(
        self,
        tmp: Path,
        hv: FakeHypervisor,
        notifier: FakeNotifier | None = None,
        *,
        meta: FakeMeta | None = None,
        workers: int = 2,
        engine: BackupEngine | None = None,
        settings: BackupSettings | None = None,
        cinder_workers: int | None = 2,
        deadlines: Deadlines | None = None,
        nova: NovaRecords | None = None,
    ) -> None:
        self.tmp, self.hv = tmp, hv
        self.journal = Journal(str(tmp / "j.sqlite"), host="h")
        self.queue = NotifyQueue(self.journal, notifier or FakeNotifier(), meta=meta)
        self.pool = KeyedPool(workers)
        # as the agent has it; None: Cinder's work shares ``pool`` (as before the split)
        self.cinder_pool = self.pool
        if cinder_workers is not None:
            self.cinder_pool = KeyedPool(cinder_workers, name="qsnap-cinder")
        self.svc = AssistedService(
            self.journal, hv, self.queue, self.pool, roots=[str(tmp)],
            backup_engine=engine, backup_settings=settings,
            cinder_pool=self.cinder_pool, deadlines=deadlines, nova=nova,
        )  # fmt: skip

    def idle(self, timeout: float) -> bool:
        """Both pools idle (Cinder's first: its jobs submit nothing to the other)."""
        return self.cinder_pool.wait_idle(timeout) and self.pool.wait_idle(timeout)

    def wait(self, op: api.Operation) -> api.Operation:
        """``op`` once the pools are idle."""
        assert self.idle(60)
        return self.svc.get_operation(CTX, op.id)

    def restart(self) -> list[Outcome]:
        """What a starting agent does: reconcile, then the queue's first flush."""
        out = reconcile(self.journal, self.svc.resumers(job_timeout=3600.0))
        assert self.idle(30)
        self.queue.flush(due_only=False)
        return out

    def close(self) -> None:
        if self.cinder_pool is not self.pool:
            self.cinder_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.journal.close()


class Bed:
    """What outlives an agent: the share with the volumes' files, the hypervisor, Cinder."""

    def __init__(self, tmp: Path, volumes: Sequence[str] = (VOL,)) -> None:
        self.tmp, self.dir = tmp, tmp / "share"
        self.hv = FakeHypervisor(self.dir, volumes)
        self.base = f"volume-{volumes[0]}"
        self.notifier = FakeNotifier(on_sent=self.cinder_heard)

    # -- Cinder's .info ledger, as Cinder keeps it (it writes it once it sees 90%) ----------
    def ledger(self, vid: str = VOL) -> Ledger | None:
        return read_ledger(str(self.dir), vid)

    def sync_ledger(self, vid: str = VOL) -> None:
        """Cinder's ledger for the live chain: ``active`` = Cinder's top (a backup checkpoint
        left out), every ``volume-<vid>.<snapshot id>`` layer mapped to its id (what creates
        and commit deletes leave; a pull maps the base's id to the active file instead)."""
        names = [n for n in self.hv.chains[vid] if ".qsnap-bk-" not in n]
        prefix = f"volume-{vid}."
        snaps = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
        snaps = {k: v for k, v in snaps.items() if not k.startswith("tmp-snap-")}
        write_ledger(str(self.dir), vid, Ledger(names[0], snaps))

    def cinder_heard(self, sid: str, report: Report) -> None:
        """Cinder's wait loop saw ``report``: on done it writes its ledger (see remotefs)."""
        if report not in (Report.CREATE_DONE, Report.DELETE_DONE):
            return
        for vid in self.hv.chains:
            old = self.ledger(vid)
            if f"volume-{vid}.{sid}" in self.hv.chains[vid] or (old and sid in old.snapshots):
                self.sync_ledger(vid)

    def agent(self, **kw: Any) -> Agent:
        return Agent(self.tmp, self.hv, self.notifier, **kw)

    def precreate(self, snap: str) -> str:
        """An overlay made as Cinder makes it: relative backing = the current top."""
        name = f"{self.base}.{snap}"
        make_image(self.dir / name, self.hv.chain[0])
        return name

    def snapshot_now(self, snap: str) -> str:
        """A snapshot taken (not by an agent under test), in Cinder's ledger."""
        name = self.precreate(snap)
        self.hv.chain.insert(0, name)
        self.sync_ledger(next(iter(self.hv.chains)))
        return name

    def crashing(self, at: str, mp: pytest.MonkeyPatch, **kw: Any) -> tuple[Agent, threading.Event]:
        """An agent that dies at crash point ``at``."""
        died = crash_at(mp, at)
        return self.agent(**kw), died

    def after_crash(self, first: Agent, died: threading.Event, mp: pytest.MonkeyPatch) -> Agent:
        """The agent restarted after ``first`` died."""
        assert died.wait(30)
        first.close()
        no_crash(mp)
        return self.agent()


class BackupBed(Bed):
    """Two 8 MiB volumes with data on one instance, a :class:`FakeEngine` and one agent
    with backups on (``engine=False``: none) over a real repository."""

    def __init__(
        self, tmp: Path, *, parallel: int = 2, engine: bool = True, **settings: Any
    ) -> None:
        (tmp / "share").mkdir()
        for i, vid in enumerate((VOL, VOL2)):
            make_image(tmp / "share" / f"volume-{vid}", size="8M", pattern=0x11 * (i + 1))
        super().__init__(tmp, (VOL, VOL2))
        self.roots = [str(tmp)]
        self.engine = FakeEngine(self.hv, self.roots)
        opts: dict[str, Any] = {"create_repository": True, **settings}
        s = BackupSettings(str(tmp / "repo"), max_parallel=parallel, keep_last=2, **opts)
        self.a = self.agent(workers=4, engine=self.engine if engine else None, settings=s)
        self.journal, self.pool, self.svc = self.a.journal, self.a.pool, self.a.svc

    def wait(self, op: api.Operation) -> api.Operation:
        return self.a.wait(op)

    def create(self, vols: list[str] | None = None, inst: str | None = None) -> api.Operation:
        req = api.CreateBackupRequest.from_wire(vols, inst, False)
        return self.wait(self.svc.create_backup(CTX, req))
