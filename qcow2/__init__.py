"""qcow2/: the format layer. Safe inspection of whole chains, guest-visible reads,
allocation maps, overlays, the Cinder ledger and offline operations. No libvirt, no network.
"""

# --- reader/inspect (Q1) ---
from qcow2._chain import Chain, Extent, ExtentKind, LayerInfo
from qcow2._inspect import inspect_chain, open_chain

# --- end reader/inspect (Q1) ---
# --- ledger/overlay/offline (Q2) ---
from qcow2._ledger import Ledger, read_ledger, write_ledger
from qcow2._offline import create_snapshot_offline, delete_snapshot_offline, load_volume
from qcow2._overlay import create_overlay, merge_overlay
from qcow2._qemu_img import convert_raw_fd_to_qcow2
from qcow2._volume_files import fsync_dir

# --- end ledger/overlay/offline (Q2) ---
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

# --- ledger/overlay/offline (Q2) ---
__all__ += [
    "Ledger",
    "convert_raw_fd_to_qcow2",
    "create_overlay",
    "create_snapshot_offline",
    "delete_snapshot_offline",
    "fsync_dir",
    "load_volume",
    "merge_overlay",
    "read_ledger",
    "write_ledger",
]
# --- end ledger/overlay/offline (Q2) ---
