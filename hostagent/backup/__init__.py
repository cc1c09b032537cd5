"""hostagent.backup: backups of attached volumes. Importing this package loads nothing.

- :mod:`.repo` -- pure: the chunked repository, the engine, restore, retention, errors.
- :mod:`.online` -- one volume's online backup on a live guest (quiesced snapshot,
  checkpoint overlay, merge back, all journaled) and its crash recovery.
- :mod:`.checkpoints` -- releasing a checkpoint overlay before a snapshot operation.
- :mod:`.live` / :mod:`.service` / :mod:`.create` -- the agent's backup verbs: settings and
  the libvirt-facing engine, the service behind the RPC verbs, one create request's run.
- :mod:`.reaper` -- checkpoint overlays merged down when their disk leaves the guest.
"""
