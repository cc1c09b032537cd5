"""One real deployment per share kind (see deployment.py).

Everything is module-scoped (one Cinder, one API, one agent, one TCG guest per share kind)
because a boot and a Cinder start cost seconds each on this 2-core host; the tests walk the
deployment through many steps instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.functional.e2e.deployment import Deployment, deploy


@pytest.fixture(scope="module")
def deployment(
    share: Any, rabbitmq: Any, libvirt_host: Any, guest_image: Any
) -> Iterator[Deployment]:
    yield from deploy(share, rabbitmq, libvirt_host.connection, guest_image)
