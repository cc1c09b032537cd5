"""The service's :class:`hostagent.service.Hypervisor` on a real libvirt connection.

Kept apart from the agent's assembly so the verbs the service needs from libvirt live in one
place that reads like the Protocol it implements.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree

from hostagent.hypervisor import Located
from hostagent.inventory import read_attachments
from hostagent.journal.crash import crash_point
from hostagent.journal.model import StepName
from hostagent.rpc import contract as api
from libvirt_ops import (
    Connection,
    Deadlines,
    DiskSnapshotSpec,
    JobOptions,
    LibvirtOpsError,
    QuiescePolicy,
    SnapshotRequest,
    active_commit,
    agent_command,
    commit,
    domain_disks,
    flatten,
    pull,
    settle_block_job,
    take_snapshot,
)
from qcow2.naming import is_uuid

LOG = logging.getLogger(__name__)

#: Namespace prefix of Nova's domain metadata (``.../nova/1.1`` today).
NOVA_METADATA_NS = "{http://openstack.org/xmlns/libvirt/nova/"

_QUIESCE = {
    api.Quiesce.REQUIRED: QuiescePolicy.REQUIRE,
    api.Quiesce.PREFERRED: QuiescePolicy.PREFER,
    api.Quiesce.NONE: QuiescePolicy.OFF,
}


class LibvirtHypervisor:
    """:class:`hostagent.service.Hypervisor` on a real libvirt connection."""

    def __init__(
        self, conn: Connection, host: str, *, roots: list[str], freeze: float, merge: float
    ) -> None:
        self._conn = conn
        self._host = host
        self._roots = roots
        self._freeze = freeze
        self._merge = merge

    def locate(self, volume_id: str) -> Located:
        hits: list[Located] = []
        for dom in self._conn.get().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                disks, dom_uuid = domain_disks(dom), dom.UUIDString()
            except libvirt.libvirtError:
                continue  # vanished between list and read
            hits += [Located(dom_uuid, d) for d in disks if (d.serial or "").lower() == volume_id]
        if not hits:
            raise api.VolumeNotFound(f"volume {volume_id} is not attached on {self._host}")
        if len(hits) > 1:
            raise api.InvalidRequest(f"volume {volume_id} is attached {len(hits)} times here")
        return hits[0]

    def nova_managed(self, domain_uuid: str) -> bool:
        """True when the domain carries Nova's ``<nova:instance>`` metadata (Nova built it and
        rebuilds it from its block-device mapping on a hard reboot or a start)."""
        try:
            xml = self._conn.get().lookupByUUIDString(domain_uuid).XMLDesc(0)
        except libvirt.libvirtError as exc:
            raise api.InstanceNotFound(f"domain {domain_uuid}: {exc}") from exc
        meta = etree.fromstring(xml.encode()).find("metadata")
        return meta is not None and any(
            str(child.tag).startswith(NOVA_METADATA_NS) for child in meta
        )

    def snapshot(self, where: Located, new_file: str) -> dict[str, Any]:
        spec = DiskSnapshotSpec(new_file, volume_id=where.disk.serial, reuse_existing=True)
        request = SnapshotRequest(
            where.domain_uuid,
            (spec,),
            quiesce=QuiescePolicy.PREFER,  # Nova's behaviour: quiesce, else crash-consistent
            deadlines=Deadlines(max_frozen=self._freeze),
        )
        res = take_snapshot(self._conn, request, roots=self._roots)
        return {
            "quiesced": res.quiesced,
            "fallback_reason": res.fallback_reason,
            "chain": [layer.path for layer in res.disks[0].chain],
        }

    def instance_volumes(self, instance_uuid: str) -> list[Located]:
        """Every volume disk (serial is a UUID) of the running domain ``instance_uuid``."""
        try:
            dom = self._conn.get().lookupByUUIDString(instance_uuid)
            if not dom.isActive():
                raise api.InstanceNotFound(f"instance {instance_uuid} is not running")
            disks, dom_uuid = domain_disks(dom), dom.UUIDString()
        except libvirt.libvirtError as exc:
            raise api.InstanceNotFound(f"instance {instance_uuid} is not on {self._host}") from exc
        return [Located(dom_uuid, d) for d in disks if is_uuid((d.serial or "").lower())]

    def snapshot_disks(
        self, domain_uuid: str, files: list[tuple[str, str]], quiesce: api.Quiesce
    ) -> dict[str, Any]:
        """ONE atomic snapshot of ``(volume_id, new_file)`` disks onto overlays WE made."""
        specs = tuple(DiskSnapshotSpec(f, volume_id=v, reuse_existing=True) for v, f in files)
        request = SnapshotRequest(
            domain_uuid,
            specs,
            quiesce=_QUIESCE[quiesce],
            deadlines=Deadlines(max_frozen=self._freeze),
        )
        res = take_snapshot(self._conn, request, roots=self._roots)
        return {
            "quiesced": res.quiesced,
            "method": res.method.value,
            "fallback_reason": res.fallback_reason,
            "frozen_s": res.timings.frozen,
            "chains": {d.volume_id: [lay.path for lay in d.chain] for d in res.disks},
        }

    def merge_owned(
        self, where: Located, file: str, progress: Callable[[int, int], None]
    ) -> dict[str, Any]:
        """Merge ``file`` into its backing file: active commit + pivot when it is the top
        (copies only the overlay), a plain commit when it is an inner layer."""
        dom = self._conn.lookup(where.domain_uuid)
        # test-only: ``merge:job`` dies like a kill -9 with the job running (inert otherwise)
        started = functools.partial(crash_point, StepName.MERGE, "job")
        opts = JobOptions(timeout=self._merge, progress=progress, started=started)
        target, roots = where.disk.target, self._roots
        if os.path.basename(where.disk.source) == file:
            res = active_commit(self._conn, dom, target, roots=roots, options=opts)
        else:
            res = commit(self._conn, dom, target, top=file, roots=roots, options=opts)
        return {
            "kind": res.kind.value,
            "chain_after": list(res.chain_after),
            "merged_away": list(res.merged_away),
            "job_bytes": res.job_bytes,
        }

    def merge(
        self,
        where: Located,
        file_to_merge: str | None,
        merge_target_file: str | None,
        progress: Callable[[int, int], None],
    ) -> dict[str, Any]:
        dom = self._conn.lookup(where.domain_uuid)
        opts = JobOptions(timeout=self._merge, progress=progress)
        target, roots = where.disk.target, self._roots
        if merge_target_file is not None:
            assert file_to_merge is not None
            res = commit(
                self._conn, dom, target, top=file_to_merge, base=merge_target_file,
                roots=roots, options=opts,
            )  # fmt: skip
        elif file_to_merge is None:
            res = flatten(self._conn, dom, target, roots=roots, options=opts)
        else:
            res = pull(self._conn, dom, target, base=file_to_merge, roots=roots, options=opts)
        return {
            "kind": res.kind.value,
            "chain_after": list(res.chain_after),
            "merged_away": list(res.merged_away),
        }

    def inventory(self) -> api.Inventory:
        return api.Inventory(self._host, read_attachments(self._conn.get()))

    def block_job(self, where: Located) -> dict[str, int]:
        """For recovery: the disk's running block job (empty when none)."""
        info = self._conn.lookup(where.domain_uuid).blockJobInfo(where.disk.target, 0)
        return dict(info) if info else {}

    def settle_job(self, where: Located, timeout: float) -> dict[str, Any]:
        """For recovery: bring a job a killed agent left on the disk to its end (an active
        commit is pivoted, its intent)."""
        dom = self._conn.lookup(where.domain_uuid)
        res = settle_block_job(
            self._conn, dom, where.disk.target, timeout=timeout, roots=self._roots
        )
        return {
            "found": res.found.name if res.found is not None else None,
            "end": res.end.name if res.end is not None else None,
            "pivoted": res.pivoted,
            "chain_after": [os.path.basename(p) for p in res.chain_after],
        }

    def thaw_if_frozen(self, domain_uuid: str) -> bool:
        """For recovery: a guest we may have frozen before a crash is thawed now."""
        dom = self._conn.lookup(domain_uuid)
        try:
            if agent_command(dom, "guest-fsfreeze-status") != "frozen":
                return False
            dom.fsThaw()
        except (LibvirtOpsError, libvirt.libvirtError) as exc:
            LOG.warning("freeze state of %s unknown: %s", domain_uuid, exc)
            return False
        return True
