"""qcow2/: the format layer. Safe inspection of whole chains, guest-visible reads,
allocation maps, overlays, the Cinder ledger and offline operations. No libvirt, no network.
"""

from qcow2.errors import CorruptImage, LedgerError, Qcow2Error, QemuImgError, UnsafeImage
from qcow2.naming import CINDER, Naming

__all__ = [
    "CINDER",
    "CorruptImage",
    "LedgerError",
    "Naming",
    "Qcow2Error",
    "QemuImgError",
    "UnsafeImage",
]
