"""Fixtures for the real test bed (libvirt + TCG guest with qemu-ga, shares, RabbitMQ).

Functional tests are the ones under ``tests/functional/`` or marked ``functional``. With
``CI=true`` a skipped functional test fails the run: a green CI must mean every real-peer
test ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from testbed import procs

if TYPE_CHECKING:
    from testbed.guest import Guest, GuestFactory
    from testbed.shares import DirShare

procs.run_id()  # fix the run id early so every child (and the leftover check) shares it

_skipped_functional: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if f"{os.sep}functional{os.sep}" in str(item.path):
            item.add_marker(pytest.mark.functional)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "functional" in report.keywords:
        _skipped_functional.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _skipped_functional:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_functional and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        terminalreporter.write_line(
            f"FAILED: {len(_skipped_functional)} functional test(s) skipped under CI: "
            + ", ".join(_skipped_functional),
            red=True,
        )


@pytest.fixture(scope="session")
def guest_image() -> object:
    from testbed.guestimage import build_guest_image

    return build_guest_image()


@pytest.fixture(scope="session")
def libvirt_host() -> Iterator[object]:
    from testbed.host import LibvirtHost

    host = LibvirtHost()
    yield host
    host.close()


@pytest.fixture(scope="session", params=["dir", "gluster"])
def share(request: pytest.FixtureRequest) -> Iterator[object]:
    from testbed.shares import make_share

    s = make_share(request.param)
    yield s
    s.close()


@pytest.fixture
def guest_factory(libvirt_host: Any, guest_image: Any, share: Any) -> Iterator[GuestFactory]:
    from testbed.guest import GuestFactory

    factory = GuestFactory(libvirt_host.connection, guest_image, lambda: share.new_dir("guest"))
    yield factory
    factory.close()


@pytest.fixture
def guest(guest_factory: GuestFactory, share: Any) -> Guest:
    return guest_factory(ndisks=2, share=share)


@pytest.fixture(scope="module")
def dir_share() -> Iterator[DirShare]:
    """A private plain-directory share for one module, beside the session's parametrized
    ``share``: for modules whose subject does not depend on the share kind (recovery reads
    the journal, the live XML and the headers) and which would double their run on both."""
    from testbed.shares import DirShare

    s = DirShare()
    yield s
    s.close()


@pytest.fixture(scope="module")
def dir_guests(libvirt_host: Any, guest_image: Any, dir_share: DirShare) -> Iterator[GuestFactory]:
    """Boots guests on the module's ``dir_share``; all destroyed when the module ends."""
    from testbed.guest import GuestFactory

    factory = GuestFactory(libvirt_host.connection, guest_image, lambda: dir_share.new_dir("guest"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[object]:
    from testbed.rabbit import RabbitNode

    node = RabbitNode()
    yield node
    node.close()


@pytest.fixture
def bed_dir() -> Iterator[Path]:
    """A fresh 0755 directory QEMU can traverse (pytest's tmp_path is 0700)."""
    import shutil
    import uuid

    d = procs.run_dir() / f"t-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
