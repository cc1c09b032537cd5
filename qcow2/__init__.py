"""qcow2/: the format layer. Safe inspection of whole chains, guest-visible reads,
allocation maps, overlays, the Cinder ledger and offline operations. No libvirt, no network.
"""

# --- reader/inspect (Q1) ---
from qcow2._chain import Chain, Extent, ExtentKind, LayerInfo
from qcow2._inspect import inspect_chain, open_chain

# --- end reader/inspect (Q1) ---
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

# --- reader/inspect (Q1) ---
__all__ += [
    "Chain",
    "Extent",
    "ExtentKind",
    "LayerInfo",
    "inspect_chain",
    "open_chain",
]
# --- end reader/inspect (Q1) ---
