"""libvirt_ops/: hypervisor verbs. Disk lookup, quiesce, external snapshots, block jobs
awaited by events with deadlines, guest-agent calls. No RPC, no HTTP, no Cinder.
"""

from libvirt_ops._connection import Connection, ensure_event_loop
from libvirt_ops._domain import ChainLayer, Disk, domain_disks, find_disk, parse_disks
from libvirt_ops.errors import (
    AgentUnavailable,
    BlockJobFailed,
    DiskBusy,
    DiskNotFound,
    DomainNotFound,
    LibvirtOpsError,
    LibvirtUnavailable,
    QuiesceFailed,
    SnapshotFailed,
    Timeout,
)

__all__ = [
    "AgentUnavailable",
    "BlockJobFailed",
    "ChainLayer",
    "Connection",
    "Disk",
    "DiskBusy",
    "DiskNotFound",
    "DomainNotFound",
    "LibvirtOpsError",
    "LibvirtUnavailable",
    "QuiesceFailed",
    "SnapshotFailed",
    "Timeout",
    "domain_disks",
    "ensure_event_loop",
    "find_disk",
    "parse_disks",
]
# --- snapshot/quiesce (L1) ---
# --- block jobs / merges (L2) ---
