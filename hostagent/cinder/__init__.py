"""hostagent.cinder: what the agent tells the volume service.

- :mod:`.status` -- snapshot status updates exactly as Cinder's remotefs drivers wait for them.
- :mod:`.records` -- create/finalize/delete snapshot metadata for snapshots the agent starts.
- :mod:`.outbox` -- the journaled retry queue both go through.
"""
