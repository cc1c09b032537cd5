"""Which host's agent has a volume (or instance): the agents' inventory, heard by fanout.

Every agent casts ``inventory_update(host, volumes, generation)`` on the fanout topic
``qsnap-inventory`` on change and every ``[agent] inventory_interval``. Anyone holding bus
credentials can cast the same, so a published inventory is a claim, not a fact. The rules:

- **Expiry.** A host is live while it was heard (a publication, or an answer to a probe)
  within ``[api] host_ttl``. An expired host routes nothing and is not in ``known_hosts()``
  (the hosts asked in fan-outs); it is forgotten at the next sweep.
- **Claims.** A volume (or instance) claimed by a host while no live host holds it is routed
  there at once. A changed claim is believed only after the claimed host answers for it: a
  claim on a key another live host holds, and a host dropping a key it holds (a restart's
  generation <= 1 update, a spoofed one), only make the router probe that host
  (``get_inventory``, a direct call with a timeout, on a background thread). The host's own
  answer then decides its keys. A contested key moves only when its holder, asked in turn,
  no longer answers for it (or does not answer at all); when both answer, the holder keeps it.
  Ties are never decided by host name. Until then requests keep going to the holder.
- **Generations** only order one host's publications: a lower one (> 1) is dropped and makes
  the router ask the host, which also heals a generation a spoofer raised.
- **Bounds.** At most ``[api] max_hosts`` hosts (expired ones are swept first; a new host past
  the cap is ignored, logged), at most ``MAX_CLAIMS`` keys per update, at most
  ``MAX_PENDING`` hosts waiting to be probed, one probe per host per ``REPROBE_INTERVAL``.

A key nobody live claims is looked up by asking the ``[api] hosts`` agents directly
(their answers are verified by nature); still unknown -> not routed (404).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hostagent.rpc import contract as api
from hostagent.rpc.client import INVENTORY_TOPIC, om

LOG = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, str]  # ("v", volume id) or ("i", instance uuid), lower case

#: Most keys one inventory may name (a host with more volumes than this is not real).
MAX_CLAIMS = 10000
#: Most hosts waiting to be probed; more are dropped (logged) until the queue drains.
MAX_PENDING = 256
#: One host is probed at most once per this many seconds (a flood of claims cannot make
#: the router hammer an agent).
REPROBE_INTERVAL = 2.0
#: Seconds between two warnings about refused hosts or dropped probes.
_WARN_EVERY = 60.0


class NotRouted(LookupError):
    """No known agent has this volume or instance attached (the API answers 404)."""


class Unverified(NotRouted):
    """Only hosts that have not yet answered for the key claim it (404, retry shortly)."""


@dataclass(frozen=True)
class RouterSettings:
    host_ttl: float = 180.0
    host_timeout: float = 5.0
    max_hosts: int = 2000

    @classmethod
    def from_conf(cls, conf: Any) -> RouterSettings:
        """From the API's ``[api]`` options; the defaults when ``conf`` does not have them."""
        try:
            group = conf.api
            return cls(float(group.host_ttl), float(group.host_timeout), int(group.max_hosts))
        except (AttributeError, LookupError):  # oslo.config's NoSuch*Error are LookupErrors
            return cls()


@dataclass
class _Host:
    name: str
    generation: int
    heard: float
    claims: frozenset[Key] = frozenset()  # what it said last (published or answered)
    held: set[Key] = field(default_factory=set)  # what is routed to it
    answered: frozenset[Key] | None = None  # its last own answer (None: never answered)
    answered_at: float = -math.inf
    probed_at: float = -math.inf


def _keys(volumes: Iterable[Mapping[str, Any]]) -> frozenset[Key]:
    out: set[Key] = set()
    for v in volumes:
        out.add(("v", str(v["volume_id"]).lower()))
        out.add(("i", str(v["instance_uuid"]).lower()))
    return frozenset(out)


class Router:
    """Thread-safe map volume/instance -> host, fed by inventory updates and probes.

    ``probe(host)`` asks that host's agent for its inventory (a direct call with a timeout);
    without it, changed claims are never believed. ``background=False`` leaves the queued
    probes to :meth:`verify_pending` (tests).
    """

    def __init__(
        self,
        static_hosts: Sequence[str] = (),
        probe: Callable[[str], api.Inventory] | None = None,
        *,
        settings: RouterSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self._static = tuple(static_hosts)
        self._probe = probe
        self.settings = settings or RouterSettings()
        self._clock = clock
        self._background = background
        self._hosts: dict[str, _Host] = {}
        self._holder: dict[Key, str] = {}
        self._answers: dict[Key, set[str]] = {}  # key -> hosts whose last answer names it
        self._due: dict[str, float] = {}  # host -> when to probe it
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_sweep = -math.inf
        self._refused: dict[str, int] = {"hosts": 0, "probes": 0}
        self._warned: dict[str, float] = {"hosts": -math.inf, "probes": -math.inf}

    def configure(self, settings: RouterSettings) -> None:
        with self._lock:
            self.settings = settings

    # -- what the agents say --------------------------------------------------------------
    def update(
        self,
        host: str,
        volumes: Iterable[Mapping[str, Any]],
        generation: int,
        *,
        probed: bool = False,
    ) -> bool:
        """Record one host's inventory; False when it was stale or refused.

        ``probed``: the host's own answer to ``get_inventory`` (it decides the host's keys);
        otherwise a publication, a claim believed as the module docstring says.
        """
        try:
            vols = list(volumes)
            if len(vols) > MAX_CLAIMS:
                LOG.warning("ignored an inventory of %d volumes from host %r", len(vols), host)
                return False
            keys, generation = _keys(vols), int(generation)
        except (KeyError, TypeError, ValueError) as exc:
            LOG.warning("ignored a malformed inventory from host %r: %r", host, exc)
            return False
        with self._lock:
            now = self._clock()
            self._maybe_sweep(now)
            if probed:
                return self._apply_answer(host, keys, generation, now)
            x = self._hosts.get(host)
            if x is None:
                if not self._room(host, now):
                    return False
                x = self._hosts[host] = _Host(host, generation, now)
            elif 1 < generation < x.generation or (
                generation == x.generation > 1 and keys != x.claims
            ):
                # stale, or x.generation was raised by someone else: the host's answer decides
                self._want_probe(host, now)
                return False
            x.heard, x.generation, x.claims = now, generation, keys
            self._settle(x, now)
        return True

    def _settle(self, x: _Host, now: float) -> None:
        """Route ``x``'s uncontested claims to it; ask it about the rest."""
        doubt = bool(x.held - x.claims)  # it says it dropped keys it holds
        for key in x.claims - x.held:
            cur = self._holder.get(key)
            if cur is not None and self._live(cur, now):
                doubt = True  # another live host holds it
                continue
            best = self._best_answering(key, now, exclude=x.name)
            if best is None:
                self._assign(key, x)  # nobody live holds it: believed
            else:  # a live host answered for it: it gets it, x is asked
                self._assign(key, best)
                doubt = True
        if doubt:
            self._want_probe(x.name, now)

    def _apply_answer(self, host: str, keys: frozenset[Key], generation: int, now: float) -> bool:
        """``host``'s own answer: exactly these keys are its own (contested ones: see below)."""
        x = self._hosts.get(host)
        if x is None:
            if not self._room(host, now):
                return False
            x = self._hosts[host] = _Host(host, generation, now)
        x.heard, x.generation, x.claims = now, generation, keys
        self._index(x, keys)
        x.answered, x.answered_at = keys, now
        for key in list(x.held - keys):
            self._release(key, x.name, now)
        for key in keys - x.held:
            cur = self._holder.get(key)
            if cur is None or not self._live(cur, now):
                self._assign(key, x)
                continue
            holder = self._hosts[cur]
            if (
                holder.answered is not None
                and key in holder.answered
                and (holder.answered_at >= now - REPROBE_INTERVAL)
            ):
                LOG.warning(
                    "hosts %s and %s both answer for %s %s; it stays routed to %s",
                    cur, host, *_what(key), cur,
                )  # fmt: skip
                continue
            LOG.info("host %s answers for %s %s held by %s: asking %s", host, *_what(key), cur, cur)
            self._want_probe(cur, now)  # the holder keeps it unless it no longer answers for it
        return True

    def _probe_failed(self, host: str, now: float) -> None:
        """``host`` did not answer: its unverified claims are dropped, and any key it holds
        that another live host answered for since goes to that host."""
        x = self._hosts.get(host)
        if x is None:
            return
        x.claims = frozenset(x.held)
        for key in list(x.held):
            best = self._best_answering(key, now, exclude=host, newer_than=x.answered_at)
            if best is not None:
                LOG.warning(
                    "%s %s moves from %s (no answer) to %s (answers for it)",
                    *_what(key), host, best.name,
                )  # fmt: skip
                self._assign(key, best)

    # -- routing state ---------------------------------------------------------------------
    def _live(self, host: str, now: float) -> bool:
        x = self._hosts.get(host)
        return x is not None and now - x.heard <= self.settings.host_ttl

    def _assign(self, key: Key, x: _Host) -> None:
        prev = self._holder.get(key)
        if prev is not None and prev in self._hosts:
            self._hosts[prev].held.discard(key)
        self._holder[key] = x.name
        x.held.add(key)

    def _release(self, key: Key, host: str, now: float) -> None:
        if self._holder.get(key) == host:
            del self._holder[key]
        if host in self._hosts:
            self._hosts[host].held.discard(key)
        best = self._best_answering(key, now, exclude=host)
        if best is not None:
            self._assign(key, best)

    def _index(self, x: _Host, answered: frozenset[Key]) -> None:
        """Record that ``x`` now answers for exactly ``answered``."""
        old = x.answered or frozenset()
        for key in old - answered:
            hosts = self._answers.get(key)
            if hosts is not None:
                hosts.discard(x.name)
                if not hosts:
                    del self._answers[key]
        for key in answered - old:
            self._answers.setdefault(key, set()).add(x.name)

    def _best_answering(
        self, key: Key, now: float, *, exclude: str, newer_than: float = -math.inf
    ) -> _Host | None:
        """The live host that answered for ``key`` most recently (never a choice by name)."""
        best: _Host | None = None
        for name in self._answers.get(key, ()):
            x = self._hosts[name]
            if (
                name != exclude
                and x.answered_at > newer_than
                and now - x.heard <= self.settings.host_ttl
                and (best is None or x.answered_at > best.answered_at)
            ):
                best = x
        return best

    def _room(self, host: str, now: float) -> bool:
        if len(self._hosts) < self.settings.max_hosts:
            return True
        if now - self._last_sweep >= 1.0:  # a flood of new names sweeps once a second at most
            self._sweep(now)
        if len(self._hosts) < self.settings.max_hosts:
            return True
        self._warn(
            "hosts",
            now,
            "ignored inventory from %d new host(s) (latest %r): %d live hosts are known, "
            "[api] max_hosts is %d",
            host,
            len(self._hosts),
            self.settings.max_hosts,
        )
        return False

    def _warn(self, kind: str, now: float, msg: str, *args: object) -> None:
        self._refused[kind] += 1
        if now - self._warned[kind] >= _WARN_EVERY:
            LOG.warning(msg, self._refused[kind], *args)
            self._warned[kind], self._refused[kind] = now, 0

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep >= self.settings.host_ttl / 4:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget expired hosts; a key one held goes to a live host that answered for it."""
        self._last_sweep = now
        dead = [x for x in self._hosts.values() if now - x.heard > self.settings.host_ttl]
        for x in dead:
            self._index(x, frozenset())
            del self._hosts[x.name]
            self._due.pop(x.name, None)
        for x in dead:
            for key in x.held:
                if self._holder.get(key) == x.name:
                    self._release(key, x.name, now)
        if dead:
            LOG.info("forgot %d expired host(s), e.g. %s", len(dead), dead[0].name)

    # -- reading ---------------------------------------------------------------------------
    def known_hosts(self) -> list[str]:
        """The live hosts and the ``[api] hosts``: the ones a fan-out asks."""
        with self._lock:
            now = self._clock()
            live = {h for h in self._hosts if self._live(h, now)}
        return sorted(live | set(self._static))

    def _find(self, key: Key) -> str | None:
        with self._lock:
            now = self._clock()
            cur = self._holder.get(key)
            if cur is not None and self._live(cur, now):
                return cur
            best = self._best_answering(key, now, exclude="")
            if best is not None:
                self._assign(key, best)
                return best.name
            claimants = [
                x for x in self._hosts.values() if key in x.claims and self._live(x.name, now)
            ]
            if len(claimants) == 1:  # no live holder: an uncontested claim
                self._assign(key, claimants[0])
                return claimants[0].name
            for x in claimants[:3]:
                self._want_probe(x.name, now)
        if claimants:
            names = ", ".join(sorted(x.name for x in claimants)[:5])
            what, ident = _what(key)
            raise Unverified(
                f"{what} {ident} is claimed by hosts that have not answered for it yet "
                f"({names}); retry shortly"
            )
        return None

    def _lookup(self, key: Key) -> str:
        host = self._find(key)
        if host is None and self._probe is not None and self._static:
            for static in self._static:
                try:
                    inv = self._probe(static)
                except Exception as exc:  # an unreachable host must not hide the others
                    LOG.warning("inventory probe of host %s failed: %s", static, exc)
                    continue
                self.update(inv.host, (vars(v) for v in inv.volumes), inv.generation, probed=True)
            host = self._find(key)
        if host is None:
            what, ident = _what(key)
            raise NotRouted(f"{what} {ident} is not attached on any known host")
        return host

    def host_for_volume(self, volume_id: str) -> str:
        return self._lookup(("v", volume_id.lower()))

    def host_for_instance(self, instance_uuid: str) -> str:
        return self._lookup(("i", instance_uuid.lower()))

    # -- probes ----------------------------------------------------------------------------
    def _want_probe(self, host: str, now: float) -> None:
        """Queue a probe of ``host`` (at most one queued per host; rate-limited)."""
        if self._probe is None or host in self._due or self._stopping:
            return
        if len(self._due) >= MAX_PENDING:
            self._warn("probes", now, "dropped %d inventory probe(s) (latest of %r): %d queued",
                       host, len(self._due))  # fmt: skip
            return
        x = self._hosts.get(host)
        self._due[host] = max(now, (x.probed_at if x else -math.inf) + REPROBE_INTERVAL)
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inventory-probe", daemon=True)
            self._thread.start()
        self._wake.notify()

    def _verify(self, host: str) -> None:
        assert self._probe is not None
        try:
            inv = self._probe(host)
            if inv.host != host:
                raise ValueError(f"it answered as host {inv.host!r}")
        except Exception as exc:
            LOG.warning(
                "host %s did not answer for its inventory: %s", host, str(exc).splitlines()[0][:200]
            )
            with self._lock:
                self._probe_failed(host, self._clock())
            return
        self.update(host, (vars(v) for v in inv.volumes), inv.generation, probed=True)

    def _take(self, host: str) -> None:
        del self._due[host]
        x = self._hosts.get(host)
        if x is not None:
            x.probed_at = self._clock()

    def _run(self) -> None:
        while (host := self._wait_due()) is not None:
            self._verify(host)

    def _wait_due(self) -> str | None:
        with self._wake:
            while not self._stopping:
                now = self._clock()
                nxt = min(self._due.items(), key=lambda kv: kv[1], default=None)
                if nxt is not None and nxt[1] <= now:
                    self._take(nxt[0])
                    return nxt[0]
                self._wake.wait(None if nxt is None else nxt[1] - now)
            return None

    def verify_pending(self) -> list[str]:
        """Run every queued probe now, in the caller (``background=False``); the hosts asked."""
        asked: list[str] = []
        while len(asked) < 10 * MAX_PENDING:
            with self._lock:
                nxt = min(self._due.items(), key=lambda kv: kv[1], default=None)
                if nxt is None:
                    return asked
                self._take(nxt[0])
            asked.append(nxt[0])
            self._verify(nxt[0])
        return asked

    def close(self) -> None:
        """Stop the probe thread (a probe under way ends within its own timeout)."""
        with self._wake:
            self._stopping = True
            self._due.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.host_timeout + 1)


def _what(key: Key) -> tuple[str, str]:
    return ("instance" if key[0] == "i" else "volume", key[1])


def bounded(agent: T, timeout: float) -> T:
    """``agent`` answering within ``timeout`` where it can (``AgentAPI.with_timeout``)."""
    with_timeout = getattr(agent, "with_timeout", None)
    return agent if with_timeout is None else with_timeout(timeout)  # type: ignore[no-any-return]


def ask_hosts(
    hosts: Sequence[str],
    call: Callable[[str], T],
    *,
    timeout: float,
    threads: int = 8,
) -> tuple[tuple[str, T] | None, dict[str, str]]:
    """``call(host)`` on every host at once; the first host that gives an answer and its answer.

    A host raising ``OperationNotFound`` does not know; one that times out or is unreachable
    is skipped the same way (its reason in the second result). Any other error of a host
    ends the search with that error (it knows the operation: NotCancellable, ...). ``call``
    should bound each host to ``timeout``; a host still running after its share of the wall
    clock (``timeout`` per round of ``threads`` hosts, plus 1 s) is skipped as timed out.
    """
    skipped: dict[str, str] = {}
    if not hosts:
        return None, skipped
    width = min(threads, len(hosts))
    pool = futures.ThreadPoolExecutor(width, thread_name_prefix="ask-hosts")
    try:
        pending = {pool.submit(call, h): h for h in hosts}
        deadline = time.monotonic() + timeout * math.ceil(len(hosts) / width) + 1.0
        while pending:
            done, _ = futures.wait(
                pending, max(0.0, deadline - time.monotonic()), futures.FIRST_COMPLETED
            )
            if not done:
                break
            for fut in done:
                host = pending.pop(fut)
                try:
                    return (host, fut.result()), skipped
                except api.OperationNotFound:
                    continue
                except om.MessagingException as exc:  # timeout, unreachable (not RemoteError)
                    if isinstance(exc, om.RemoteError):
                        raise
                    LOG.warning("host %s skipped: %s", host, str(exc).splitlines()[0][:200])
                    skipped[host] = (
                        "no answer in time"
                        if isinstance(exc, om.MessagingTimeout)
                        else f"unreachable: {type(exc).__name__}"
                    )
        for host in pending.values():
            LOG.warning("host %s skipped: no answer within %.1f s", host, timeout)
            skipped[host] = "no answer in time"
        return None, skipped
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _InventoryEndpoint:
    target = om.Target(version="1.0")

    def __init__(self, router: Router) -> None:
        self._router = router

    def inventory_update(
        self, ctxt: Any, host: str, volumes: list[dict[str, Any]], generation: int
    ) -> None:
        if not self._router.update(str(host), volumes, generation):
            LOG.debug("dropped inventory generation %s of %s", generation, host)


class InventoryListener:
    """An RPC server on the fanout topic feeding ``router``; start() / stop()."""

    def __init__(self, transport: Any, router: Router) -> None:
        self._router = router
        name = f"qsnap-api-{socket.gethostname()}-{os.getpid()}"
        self._server = om.get_rpc_server(
            transport,
            om.Target(topic=INVENTORY_TOPIC, server=name),
            [_InventoryEndpoint(router)],
            executor="threading",
        )

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._server.wait()
        self._router.close()
