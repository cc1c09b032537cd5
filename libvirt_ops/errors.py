"""One exception hierarchy for the hypervisor layer.

Callers (the agent) map these to operation outcomes; each carries enough context
(domain, disk, job) to be reported to an operator as is.
"""

from __future__ import annotations


class LibvirtOpsError(Exception):
    """Base of every error raised by :mod:`libvirt_ops`."""


class LibvirtUnavailable(LibvirtOpsError):
    """libvirtd could not be reached within the deadline."""


class DomainNotFound(LibvirtOpsError):
    """No running domain with that name/UUID on this host."""


class DiskNotFound(LibvirtOpsError):
    """No disk of the domain matches the volume id or source path."""


class DiskBusy(LibvirtOpsError):
    """The disk already has a block job (ours or another's); try again later."""


class AgentUnavailable(LibvirtOpsError):
    """The guest agent is not connected or did not answer within the deadline."""


class QuiesceFailed(LibvirtOpsError):
    """Freezing the guest's filesystems failed; under policy ``require`` nothing was changed."""


class SnapshotFailed(LibvirtOpsError):
    """The external snapshot transaction failed; overlays were removed, the domain unchanged."""


class BlockJobFailed(LibvirtOpsError):
    """A block job failed, was cancelled, vanished, or left a chain other than expected."""


class Timeout(LibvirtOpsError):
    """A wait hit its deadline."""
