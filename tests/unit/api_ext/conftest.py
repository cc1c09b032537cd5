"""Fixtures of the CLI modules: one CLI server per module in front of the fake agents that
each test refills (its module's ``agents`` fixture fills ``cli_agents``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.unit.api_ext.cli_harness import Server
from tests.unit.api_ext.fakes import FakeAgent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``OS_*`` or ``QSNAP_URL`` from the caller's shell reaches the CLI."""
    for key in list(os.environ):
        if key.startswith("OS_") or key == "QSNAP_URL":
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def cli_agents() -> dict[str, FakeAgent]:
    return {}


@pytest.fixture(scope="module")
def module_server(
    cli_agents: dict[str, FakeAgent], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = Server(cli_agents, ["admin"], tmp_path_factory.mktemp("cli"))
    yield srv
    srv.stop()


@pytest.fixture
def server(module_server: Server, agents: dict[str, FakeAgent]) -> Server:
    """The module's server, its agents fresh for this test."""
    return module_server
