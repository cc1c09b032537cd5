"""hostagent.snapshots: snapshot operations, each kind's run and resume together.

- :mod:`.instance` -- one quiesced snapshot of several disks (agent-owned, Cinder records).
- :mod:`.owned_delete` -- deleting an agent-owned snapshot (active commit or commit).
- :mod:`.owned_base`, :mod:`.owned` -- what both share, and their recovery entry.
"""
