"""What the Nova bed reads back to judge coherence: Nova's BDM, Cinder's attachment and
``os-initialize_connection``, the ``.info`` ledger, the live XML and the files' real formats.

Why a mixin of its own: these are the records every must-show compares after each step (the
rule above all others), kept apart from the bring-up and life cycle of :mod:`testbed.nova`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from libvirt_ops import find_disk
from testbed.cinder import CONNECTOR, CinderPeer
from testbed.mariadb import MariaDB
from testbed.nova_guest import Server
from testbed.nova_services import NovaBedError

_UUID = re.compile(r"^[0-9a-f-]{36}$")


def _uuid(value: str) -> str:
    if not _UUID.match(value):
        raise ValueError(f"not a uuid: {value!r}")
    return value


class NovaRecords:
    """The records of one Nova bed; :class:`testbed.nova.NovaCloud` provides the peers."""

    db: MariaDB
    cinder: CinderPeer
    host: str
    _share_dir: Path

    def volume_path(self, volume_id: str, name: str | None = None) -> Path:
        return self._share_dir / (name or f"volume-{volume_id}")

    def settle(self, volume_id: str, timeout: float = 30.0) -> bool:
        """Wait until Nova's BDM names the file Cinder's ``.info`` calls active; False at
        the deadline (no raise: the caller's checks judge). Why: Cinder calls a snapshot
        done when Nova reports 90 %, and Nova refreshes its BDM only after that report, so
        for a moment the two disagree even on the stock path (seen on the gluster share)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.db.sql(
                "SELECT connection_info FROM block_device_mapping WHERE deleted = 0 AND "  # noqa: S608
                f"volume_id = '{_uuid(volume_id)}'",
                "nova_cell1",
            ).stdout.split("\n")  # fmt: skip
            names = {
                json.loads(r)["data"].get("name") for r in rows if r.strip() not in ("", "NULL")
            }
            active = self.info_active(volume_id) or f"volume-{volume_id}"
            if not names or names == {active}:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    # -- the records that must agree -----------------------------------------------------
    def bdm_connection_info(self, server_id: str, volume_id: str) -> dict[str, Any]:
        """Nova's BDM ``connection_info`` from the cell database: what a hard reboot uses."""
        out = self.db.sql(
            "SELECT connection_info FROM block_device_mapping WHERE deleted = 0 AND "  # noqa: S608
            f"instance_uuid = '{_uuid(server_id)}' AND volume_id = '{_uuid(volume_id)}'",
            "nova_cell1",
        ).stdout.strip()  # fmt: skip
        if not out:
            raise NovaBedError(f"no BDM for volume {volume_id} of server {server_id}")
        return dict(json.loads(out.splitlines()[0]))

    def attachment_connection_info(self, volume_id: str) -> dict[str, Any]:
        """Cinder's attachment record (the volume's only attachment) ``connection_info``."""
        c = self.cinder.client("3.44")
        atts = c.volumes.get(volume_id).attachments
        if len(atts) != 1:
            raise NovaBedError(f"volume {volume_id} has {len(atts)} attachments")
        att = c.attachments.show(atts[0]["attachment_id"])
        return dict(att.connection_info)

    def initialize_connection(self, volume_id: str) -> dict[str, Any]:
        """``os-initialize_connection``'s ``data`` (what Cinder would hand a new connector)."""
        c = self.cinder.client()
        info = c.volumes.initialize_connection(volume_id, dict(CONNECTOR, host=self.host))
        return dict(info["data"])

    def info_active(self, volume_id: str) -> str | None:
        """``active`` of Cinder's ``volume-<id>.info`` (None before its first snapshot)."""
        p = self.volume_path(volume_id, f"volume-{volume_id}.info")
        if not p.exists():
            return None
        return str(json.loads(p.read_text())["active"])

    def live_top(self, server: Server, volume_id: str) -> tuple[str, str]:
        """(file name, format) of the disk's active layer in the live domain XML."""
        top = find_disk(server.guest.dom, volume_id=volume_id).chain[0]
        return os.path.basename(top.path), top.fmt

    def file_format(self, volume_id: str, name: str) -> str:
        out = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(self.volume_path(volume_id, name))],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        return str(json.loads(out)["format"])

    def views(self, server: Server, volume_id: str) -> dict[str, tuple[str, str]]:
        """Every record of the volume's active file as (name, format): Nova's BDM, Cinder's
        attachment, os-initialize_connection, the live XML, and (file name, real format)."""
        bdm = self.bdm_connection_info(server.id, volume_id)["data"]
        att = self.attachment_connection_info(volume_id)
        init = self.initialize_connection(volume_id)
        live = self.live_top(server, volume_id)
        active = self.info_active(volume_id) or f"volume-{volume_id}"
        return {
            "bdm": (bdm["name"], bdm.get("format", "raw")),
            "attachment": (att["name"], att.get("format", "raw")),
            "initialize_connection": (init["name"], init.get("format", "raw")),
            "live": live,
            "info": (active, self.file_format(volume_id, active)),
        }
