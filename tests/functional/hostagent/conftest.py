"""Fixtures for hostagent functional tests: a real Cinder peer (see testbed/cinder.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.cinder import VENV, CinderPeer
from testbed.shares import DirShare


@pytest.fixture(scope="module")
def nova_endpoint() -> str:
    """Where Cinder's ``[nova] endpoint`` points; override in a module to serve a stub Nova."""
    return "http://127.0.0.1:9/v2.1"


@pytest.fixture(scope="module")
def cinder(dir_share: DirShare, nova_endpoint: str) -> Iterator[CinderPeer]:
    """On a plain-directory share: the NfsDriver's no-op mount makes it the mount point."""
    if not (VENV / "bin" / "cinder-manage").exists():
        pytest.skip(f"no Cinder venv at {VENV}: run tools/cinder_setup.sh")
    with CinderPeer(dir_share.new_dir("cinder"), nova_endpoint=nova_endpoint) as peer:
        yield peer
