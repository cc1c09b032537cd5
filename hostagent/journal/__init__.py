"""hostagent.journal: the durable record of every operation and its steps.

- :mod:`.model` -- operations, steps, states and step names (stdlib only).
- :mod:`.store` -- :class:`~.store.Journal`, the sqlite WAL store (operations; its errors and
  ``backoff`` importable from there). Beneath it, by table: :mod:`.steps`, :mod:`.notices`
  (notices owed to the volume service); :mod:`.sqlite` the connection and transactions,
  :mod:`.rows` row reading, :mod:`.errors` the errors; :mod:`.schema` migrates the file.
- :mod:`.events` -- operation notifications published from journal transitions.
- :mod:`.crash` -- the TEST-ONLY kill switch every journaled step passes through.
"""
