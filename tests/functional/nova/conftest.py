"""The ``nova_cloud`` fixture: a real Nova + Placement + Cinder per share kind (testbed/nova.py).

Module-scoped and parametrized over ``dir`` (a directory on its own loop-mounted ext4) and
``gluster`` (the bed's GlusterFS FUSE mount): a bring-up costs ~20-40 s, so a module walks
one cloud through many steps. A module picks the compute driver and extra nova.conf groups by
overriding ``nova_compute_driver`` / ``nova_extra_conf``, e.g.::

    @pytest.fixture(scope="module")
    def nova_compute_driver() -> str:
        return "api_ext.nova_driver.QsnapLibvirtDriver"
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from testbed.nova import STOCK_DRIVER, NovaCloud
from testbed.nova_conf import VENV


@pytest.fixture(scope="module")
def nova_compute_driver() -> str:
    """Nova's ``compute_driver``: Nova's form or a full dotted path (see testbed/nova.py)."""
    return STOCK_DRIVER


@pytest.fixture(scope="module")
def nova_extra_conf() -> dict[str, dict[str, str]]:
    """Groups merged into nova.conf (e.g. ``{"qsnap": {...}}``)."""
    return {}


@pytest.fixture(scope="module", params=["dir", "gluster"], ids=["dir", "gluster"])
def nova_cloud(
    request: pytest.FixtureRequest,
    libvirt_host: Any,
    guest_image: Any,
    nova_compute_driver: str,
    nova_extra_conf: dict[str, dict[str, str]],
) -> Iterator[NovaCloud]:
    if not (VENV / "bin" / "nova-manage").exists():
        pytest.skip(f"no Nova venv at {VENV}: run tools/nova_setup.sh")
    cloud = NovaCloud(
        request.param,
        compute_driver=nova_compute_driver,
        extra_nova_conf=nova_extra_conf,
        image=guest_image,
        conn=libvirt_host.connection,
    )
    try:
        yield cloud
    finally:
        cloud.close()
