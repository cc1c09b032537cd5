"""hostagent: the per-host agent (``qsnap-agent``). Importing this package loads nothing.

A map, top to bottom (arrows point down only; ``make lint`` checks it):

- :mod:`.agent`, :mod:`.cli` -- the process: wiring, start/stop, recovery before serving.
- :mod:`.recovery` -- :func:`reconcile`: finish or fail what a killed agent left, by kind.
- :mod:`.service` -- the RPC verbs (:class:`AssistedService`), delegating by concept.
- :mod:`.snapshots` -- assisted create/delete, instance snapshots, agent-owned deletes.
- :mod:`.backup` -- online backups, checkpoints; :mod:`.backup.repo` is the pure repository.
- :mod:`.hypervisor` -- ONE :class:`Hypervisor` Protocol, :class:`Located`, chain checks;
  :mod:`.libvirt_hypervisor` implements it, :mod:`.inventory` lists attached volumes.
- :mod:`.cinder` -- the volume service: status reports, snapshot records, the outbox.
- :mod:`.journal` -- the sqlite journal of operations and steps, its model and events.
- :mod:`.rpc` -- the wire contract (:mod:`.rpc.contract`, what ``api_ext`` imports; no
  libvirt), the RPC server and client.
- :mod:`.errors` -- the agent's error root; :mod:`.config`, :mod:`.pool` -- plumbing.
"""
