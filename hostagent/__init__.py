"""hostagent/: the per-host agent. Public face: the journal and its model, the service
(AgentService implementation), the RPC contract types and errors."""

from hostagent.journal import IdempotencyConflict, Journal, JournalError, UnknownOperation
from hostagent.operations import (
    Notification,
    Operation,
    OperationKind,
    OperationState,
    Step,
    StepState,
)
from hostagent.service import AssistedService, Hypervisor, Located
from hostagent.service_api import (
    AgentRpcError,
    AgentService,
    DiskBusy,
    InvalidRequest,
    OperationNotFound,
    VolumeNotFound,
)

__all__ = [
    "AgentRpcError",
    "AgentService",
    "AssistedService",
    "DiskBusy",
    "Hypervisor",
    "IdempotencyConflict",
    "InvalidRequest",
    "Journal",
    "JournalError",
    "Located",
    "Notification",
    "Operation",
    "OperationKind",
    "OperationNotFound",
    "OperationState",
    "Step",
    "StepState",
    "UnknownOperation",
    "VolumeNotFound",
]
