"""hostagent.journal: the durable record of every operation and its steps.

- :mod:`.model` -- operations, steps, states and step names (stdlib only).
- :mod:`.store` -- :class:`~.store.Journal`, the sqlite WAL store; :mod:`.schema` migrates it.
- :mod:`.events` -- operation notifications published from journal transitions.
- :mod:`.crash` -- the TEST-ONLY kill switch every journaled step passes through.
"""
