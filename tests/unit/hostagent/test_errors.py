"""One error root: every exception class hostagent defines derives from QsnapAgentError."""

from __future__ import annotations

import importlib
import pkgutil

import hostagent
from hostagent.errors import QsnapAgentError


def _subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_hostagent_exception_derives_from_the_root() -> None:
    names = [m.name for m in pkgutil.walk_packages(hostagent.__path__, "hostagent.")]
    for name in names:  # all of them, libvirt ones included: no module may hide an error
        importlib.import_module(name)
    ours = {
        cls
        for cls in _subclasses(BaseException)
        if cls.__module__ == "hostagent" or cls.__module__.startswith("hostagent.")
    }
    assert len(ours) > 25  # the walk really found the agent's errors
    assert sorted(c.__qualname__ for c in ours if not issubclass(c, QsnapAgentError)) == []


def test_the_root_is_an_exception_below_which_old_excepts_still_work() -> None:
    from hostagent.backup.repo import BackupError, FormatError
    from hostagent.journal.store import JournalError, UnknownOperation
    from hostagent.rpc.contract import AgentRpcError, InvalidRequest

    assert issubclass(QsnapAgentError, Exception)
    assert issubclass(UnknownOperation, JournalError)
    assert issubclass(FormatError, BackupError)
    assert issubclass(InvalidRequest, AgentRpcError)
