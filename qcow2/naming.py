"""The volume file naming convention Cinder's NFS/remotefs drivers use.

``volume-<uuid>`` is a volume's base file, ``volume-<uuid>.<snapshot-uuid>`` the overlay
created when that snapshot was taken, ``volume-<uuid>.tmp-snap-<uuid>`` a temporary one,
``volume-<uuid>.info`` the ledger. Only names of these shapes may appear as backing names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

#: Cinder's own pattern (remotefs.py), anchored: base, snapshot overlay or temporary overlay.
DEFAULT_IMAGE_PATTERN = rf"volume-{_UUID}(\.(tmp-snap-)?{_UUID})?"


@dataclass(frozen=True)
class Naming:
    """A compiled naming convention; ``Naming()`` is Cinder's."""

    image_pattern: str = DEFAULT_IMAGE_PATTERN

    def __post_init__(self) -> None:
        object.__setattr__(self, "_re", re.compile(self.image_pattern))

    def is_image_name(self, name: str) -> bool:
        """True when ``name`` is a plain basename matching the convention."""
        return bool(self._re.fullmatch(name))  # type: ignore[attr-defined]


CINDER = Naming()

UUID_RE = re.compile(_UUID)


def is_uuid(value: str) -> bool:
    """True for a lower-case canonical UUID, the only form volume and snapshot ids take."""
    return bool(UUID_RE.fullmatch(value))


def volume_base_name(volume_id: str) -> str:
    """``volume-<uuid>``: the name of a volume's base file."""
    return f"volume-{volume_id}"


def snapshot_file_name(volume_id: str, snapshot_id: str, *, temporary: bool = False) -> str:
    """The overlay file created when ``snapshot_id`` is taken (Cinder's convention)."""
    middle = "tmp-snap-" if temporary else ""
    return f"volume-{volume_id}.{middle}{snapshot_id}"


def ledger_name(volume_id: str) -> str:
    """``volume-<uuid>.info``: the ledger Cinder keeps beside the volume."""
    return f"volume-{volume_id}.info"
