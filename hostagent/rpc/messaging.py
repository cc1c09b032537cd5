"""oslo.messaging without eventlet: pick oslo.service's threading backend before import.

oslo.messaging imports oslo.service's looping calls at import time; without a backend chosen
first it silently selects eventlet (and warns). Every module of the agent that touches
oslo.messaging imports it through :func:`messaging` so the choice is made exactly once.
"""

from __future__ import annotations

import types

from oslo_config import cfg
from oslo_service import backend


def init_threading_backend() -> None:
    """Select the threading backend; idempotent, raises if eventlet was chosen already."""
    backend.init_backend(backend.BackendType.THREADING)


def messaging() -> types.ModuleType:
    """The ``oslo_messaging`` module, imported after the threading backend is selected.

    Inside a host process that chose its backend already (nova-compute loading qsnap's
    driver, in eventlet mode) that choice stands: the process owns its concurrency model.
    """
    from oslo_service.backend import exceptions as backend_errors

    try:
        init_threading_backend()
    except backend_errors.BackendAlreadySelected:
        pass
    import oslo_messaging

    module: types.ModuleType = oslo_messaging
    return module


def register_messaging_opts(conf: cfg.ConfigOpts) -> None:
    """Register every option oslo.messaging reads on a private ``ConfigOpts``.

    oslo.messaging registers its tracing and metrics groups only on the global ``cfg.CONF``
    at import; a private ``ConfigOpts`` lacks them and every ``call()`` fails with
    NoSuchOptError. We use a private one anyway (several agents/tests in one process, no
    global state), so we register ``list_opts()`` plus those two groups ourselves.
    """
    messaging()
    from oslo_messaging import opts
    from oslo_messaging._metrics import client as metrics_client
    from oslo_messaging._tracing import client as tracing_client

    for group, group_opts in opts.list_opts():
        conf.register_opts(group_opts, group=group)
    conf.register_opts(metrics_client.oslo_messaging_metrics, group="oslo_messaging_metrics")
    conf.register_opts(tracing_client.oslo_messaging_tracing, group="oslo_messaging_tracing")
