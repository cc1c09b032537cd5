"""The ``qsnap-agent`` the backup modules run: no Cinder (``[cinder] enabled = false``), its
repository under the test's directory (``work/repo``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testbed.agent import AgentProcess


class BackupAgent(AgentProcess):
    """``backup`` adds options to the ``[backup]`` group (e.g. ``{"bandwidth_mib": 4}``)."""

    def __init__(
        self,
        share_root: Path,
        rabbit: Any,
        work: Path,
        *,
        workers: int = 2,
        max_parallel: int = 1,
        backup: Mapping[str, object] | None = None,
    ) -> None:
        self.repo = work / "repo"
        conf: dict[str, Mapping[str, object]] = {
            "agent": {"workers": workers, "merge_timeout": 120},
            "cinder": {"enabled": "false"},
            "backup": {
                "repository": self.repo,
                "create_repository": True,
                "max_parallel": max_parallel,
                **(backup or {}),
            },
        }
        super().__init__(
            work, rabbit.transport_url, share_root, prefix="bk", conf=conf, stop_timeout=30
        )
