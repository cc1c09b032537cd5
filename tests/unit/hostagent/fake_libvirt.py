"""libvirt_ops-level fakes (a domain, a connection, a settle) for code that talks to libvirt
without the Hypervisor in between: :mod:`hostagent.backup.legacy`. Not a test module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt_ops as lo
from tests.unit.hostagent.fakes import VOL


class FakeDom:
    """A running domain with one disk ``vdb`` of volume ``volume`` on ``chain`` in ``share``."""

    def __init__(self, share: Path, chain: list[str], volume: str = VOL) -> None:
        self.share, self.chain, self.volume = share, chain, volume
        self.jobs: list[tuple[str, str]] = []

    def isActive(self) -> bool:
        return True

    def disk(self) -> lo.Disk:
        layers = tuple(
            lo.ChainLayer(str(self.share / n), "qcow2", None if i == 0 else i)
            for i, n in enumerate(self.chain)
        )
        return lo.Disk("vdb", self.volume, "virtio", layers)


class FakeConn:
    def __init__(self, dom: FakeDom) -> None:
        self.dom = dom

    def lookup(self, _name: str) -> FakeDom:
        return self.dom


def no_left_job(_c: Any, dom: FakeDom, target: str, **_kw: Any) -> lo.SettleResult:
    """``settle_block_job`` for these fakes: they model no job a dead agent left."""
    chain = tuple(dom.chain)
    return lo.SettleResult(target, None, None, False, chain, chain, 0.0)
