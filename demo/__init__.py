"""``make demo``: qsnap's main job end to end in one process on embedded defaults.

qsnap-api (noauth, 127.0.0.1, a free port) and the agent share one in-process ``fake://``
oslo.messaging transport; state is sqlite in a temporary directory; the share is a local
directory under /var/lib/qsnap-demo; the guest is the test bed's TCG guest with a record
writer per filesystem. Every step goes through the real HTTP API. ``python -m demo``.
"""
