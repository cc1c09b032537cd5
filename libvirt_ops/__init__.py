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
from libvirt_ops._agent import (
    AgentCommandFailed,
    GuestFilesystem,
    agent_command,
    agent_connected,
    guest_fsinfo,
    wait_agent_connected,
    wait_agent_state,
)
from libvirt_ops._quiesce import FreezeMethod, QuiescePolicy
from libvirt_ops._snapshot import (
    Deadlines,
    DiskSnapshotResult,
    DiskSnapshotSpec,
    SnapshotRequest,
    SnapshotResult,
    SnapshotTimings,
    take_snapshot,
)

__all__ += [
    "AgentCommandFailed",
    "Deadlines",
    "DiskSnapshotResult",
    "DiskSnapshotSpec",
    "FreezeMethod",
    "GuestFilesystem",
    "QuiescePolicy",
    "SnapshotRequest",
    "SnapshotResult",
    "SnapshotTimings",
    "agent_command",
    "agent_connected",
    "guest_fsinfo",
    "take_snapshot",
    "wait_agent_connected",
    "wait_agent_state",
]
# --- block jobs / merges (L2) ---
from libvirt_ops._blockjob import BlockJob, CancelToken, JobEnd, JobOptions, JobType  # noqa: E402
from libvirt_ops._merge import (  # noqa: E402
    ChainMismatch,
    MergeKind,
    MergeResult,
    active_commit,
    commit,
    flatten,
    pull,
    resolve_disk,
    resolve_layer,
)
from libvirt_ops._settle import SettleResult, settle_block_job  # noqa: E402

__all__ += [
    "BlockJob",
    "CancelToken",
    "ChainMismatch",
    "JobEnd",
    "JobOptions",
    "JobType",
    "MergeKind",
    "MergeResult",
    "SettleResult",
    "active_commit",
    "commit",
    "flatten",
    "pull",
    "resolve_disk",
    "resolve_layer",
    "settle_block_job",
]
# --- end block jobs / merges (L2) ---
# --- persistent definitions ---
from libvirt_ops._redefine import retarget_inactive_disks  # noqa: E402

__all__ += ["retarget_inactive_disks"]
