"""Tell Cinder's volume service that an assisted snapshot step finished (or failed).

Cinder's remotefs driver polls its DB for exactly these states (see peers.md): create is done
at ``creating`` + ``90%``, delete at ``deleting`` + ``90%``. Reporting ``available`` for an
assisted snapshot makes Cinder's wait loop spin forever, so no public method can send it:
the four reports below are the whole API. Every call retries transient failures (connection
errors, 5xx) with exponential backoff under one deadline and returns or raises a typed
outcome, so the caller can journal a notification that did not get through.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hostagent.errors import QsnapAgentError
from qcow2.naming import is_uuid


@dataclass(frozen=True)
class NoAuthSettings:
    """Cinder with ``auth_strategy = noauth`` (tests, isolated deployments)."""

    endpoint: str  # ".../v3", without the project
    project_id: str
    user_id: str = "qsnap"


@dataclass(frozen=True)
class NoneAuthSettings:
    """keystoneauth ``auth_type = none``: a fixed endpoint that already names the project."""

    endpoint: str  # ".../v3/<project_id>"


@dataclass(frozen=True)
class PasswordSettings:
    """Keystone v3 password auth; the catalog gives Cinder's endpoint."""

    auth_url: str
    username: str
    password: str
    project_name: str
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    region_name: str | None = None
    interface: str = "internal"


AuthSettings = NoAuthSettings | NoneAuthSettings | PasswordSettings


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff first_delay, x factor, capped at max_delay, until deadline (seconds)."""

    deadline: float = 120.0
    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 10.0
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not (self.deadline > 0 and self.first_delay > 0 and self.factor >= 1):
            raise ValueError(f"bad retry policy {self}")
        if not (self.max_delay >= self.first_delay and self.request_timeout > 0):
            raise ValueError(f"bad retry policy {self}")


class Report(enum.Enum):
    """The only (status, progress) pairs we ever send; there is deliberately no 'available'."""

    CREATE_DONE = ("creating", "90%")
    CREATE_FAILED = ("error", None)
    DELETE_DONE = ("deleting", "90%")
    DELETE_FAILED = ("error_deleting", None)

    @property
    def body(self) -> dict[str, str]:
        status, progress = self.value
        return {"status": status} if progress is None else {"status": status, "progress": progress}


@dataclass(frozen=True)
class Reported:
    """Cinder accepted the update."""

    snapshot_id: str
    report: Report
    attempts: int


class NotifyError(QsnapAgentError):
    """A report that did not land; carries what the journal needs to retry or alert."""

    def __init__(self, snapshot_id: str, report: Report, attempts: int, detail: str) -> None:
        super().__init__(f"{report.name} for snapshot {snapshot_id}: {detail}")
        self.snapshot_id = snapshot_id
        self.report = report
        self.attempts = attempts
        self.detail = detail


class NotifyRejected(NotifyError):
    """Cinder answered 4xx (e.g. the snapshot is not in a state that allows this update).

    Retrying cannot help, so none is attempted; ``detail`` is Cinder's own message.
    """

    def __init__(self, snapshot_id: str, report: Report, attempts: int, code: int, msg: str):
        super().__init__(snapshot_id, report, attempts, f"HTTP {code}: {msg}")
        self.code = code


class NotifyUnreachable(NotifyError):
    """Connection errors or 5xx until the deadline passed."""


Sleep = Callable[[float], None]
Clock = Callable[[], float]


def make_session(auth: AuthSettings, timeout: float) -> Any:
    """A keystoneauth session for ``auth`` (shared by the status notifier and cinder_meta)."""
    from keystoneauth1 import session

    plugin: Any
    if isinstance(auth, NoAuthSettings):
        from cinderclient.contrib.noauth import CinderNoAuthPlugin

        plugin = CinderNoAuthPlugin(auth.user_id, auth.project_id, endpoint=auth.endpoint)
    elif isinstance(auth, NoneAuthSettings):
        from keystoneauth1 import noauth

        plugin = noauth.NoAuth(endpoint=auth.endpoint)
    else:
        from keystoneauth1.identity import v3

        plugin = v3.Password(
            auth_url=auth.auth_url,
            username=auth.username,
            password=auth.password,
            project_name=auth.project_name,
            user_domain_name=auth.user_domain_name,
            project_domain_name=auth.project_domain_name,
        )
    return session.Session(auth=plugin, timeout=timeout)


class CinderNotifier:
    """Reports assisted-snapshot outcomes to Cinder; one instance per configured Cinder."""

    def __init__(
        self,
        auth: AuthSettings,
        retry: RetryPolicy | None = None,
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        from cinderclient import client as cclient

        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        kwargs: dict[str, Any] = {}
        if isinstance(auth, PasswordSettings):
            kwargs = {"region_name": auth.region_name, "endpoint_type": auth.interface}
        self._client: Any = cclient.Client(
            "3.0", session=make_session(auth, self._retry.request_timeout), **kwargs
        )

    def report_create_done(self, snapshot_id: str) -> Reported:
        return self._report(snapshot_id, Report.CREATE_DONE)

    def report_create_failed(self, snapshot_id: str) -> Reported:
        return self._report(snapshot_id, Report.CREATE_FAILED)

    def report_delete_done(self, snapshot_id: str) -> Reported:
        return self._report(snapshot_id, Report.DELETE_DONE)

    def report_delete_failed(self, snapshot_id: str) -> Reported:
        return self._report(snapshot_id, Report.DELETE_FAILED)

    def _report(self, snapshot_id: str, report: Report) -> Reported:
        if not is_uuid(snapshot_id):
            raise ValueError(f"snapshot id {snapshot_id!r} is not a UUID")
        try:
            _, attempts = retry_call(
                lambda: self._client.volume_snapshots.update_snapshot_status(
                    snapshot_id, report.body
                ),
                self._retry,
                sleep=self._sleep,
                clock=self._clock,
            )
        except CallRejected as exc:
            raise NotifyRejected(snapshot_id, report, exc.attempts, exc.code, exc.msg) from exc
        except CallUnreachable as exc:
            raise NotifyUnreachable(snapshot_id, report, exc.attempts, exc.last) from exc
        return Reported(snapshot_id, report, attempts)


class CallRejected(QsnapAgentError):
    """A Cinder call answered 4xx: retrying cannot help (``code``, Cinder's ``msg``)."""

    def __init__(self, code: int, msg: str, attempts: int) -> None:
        super().__init__(f"HTTP {code}: {msg}")
        self.code, self.msg, self.attempts = code, msg, attempts


class CallUnreachable(QsnapAgentError):
    """Connection errors or 5xx until the retry deadline passed; ``last`` is the last one."""

    def __init__(self, last: str, attempts: int) -> None:
        super().__init__(last)
        self.last, self.attempts = last, attempts


def retry_call(
    call: Callable[[], Any],
    retry: RetryPolicy,
    *,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> tuple[Any, int]:
    """``call()`` retried with backoff on connection errors and 5xx: (result, attempts).

    One loop for every Cinder call the agent makes, so each backs off the same way.
    """
    from cinderclient import exceptions as cexc
    from keystoneauth1 import exceptions as kexc

    deadline = clock() + retry.deadline
    delay = retry.first_delay
    attempts = 0
    while True:
        attempts += 1
        try:
            return call(), attempts
        except cexc.ClientException as exc:
            code = int(getattr(exc, "code", 0) or 0)
            if 400 <= code < 500:
                raise CallRejected(code, str(getattr(exc, "message", "") or exc), attempts) from exc
            last = f"HTTP {code}: {exc}"
        except (kexc.ConnectionError, kexc.RetriableConnectionFailure) as exc:
            last = f"{type(exc).__name__}: {exc}"
        remaining = deadline - clock()
        if remaining <= 0:
            raise CallUnreachable(last, attempts)
        sleep(min(delay, remaining))
        delay = min(delay * retry.factor, retry.max_delay)
