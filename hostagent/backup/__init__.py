"""hostagent.backup: backups of attached volumes. Importing this package loads nothing.

- :mod:`.repo` -- pure: the chunked repository, the engine, restore, retention, errors.
- :mod:`.online` -- one volume's online backup on a live guest (read at a checkpoint that is
  a recorded Cinder snapshot, older checkpoints dropped, all journaled) and its recovery.
- :mod:`.live` / :mod:`.service` / :mod:`.create` -- the agent's backup verbs: settings and
  the hypervisor-facing engine, the service behind the RPC verbs, one create request's run.
- :mod:`.legacy` -- an earlier qsnap's checkpoint overlays, released once at start.
"""
