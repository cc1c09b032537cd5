"""hostagent.rpc: the agent's oslo.messaging RPC API.

- :mod:`.contract` -- the wire contract: typed requests, results, errors. ``api_ext``
  imports this and :mod:`.client`; neither reaches libvirt.
- :mod:`.agent_service` -- the ``AgentService`` protocol the endpoint delegates to.
- :mod:`.nova_side` -- the agent's client of qsnap's driver inside nova-compute (BDM refresh).
- :mod:`.server` -- the endpoint: wire dicts to typed requests, lower errors to wire errors
  by :mod:`.wire_errors`, the one lower -> wire mapping (the backup service uses it too).
- :mod:`.client` -- the versioned client (``qsnap-api`` and tools).
- :mod:`.messaging` -- the oslo.messaging import and option registration.
"""
