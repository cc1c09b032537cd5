"""The journal's steps: numbering, transitions, the step context, durability across kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from hostagent.journal.model import ErrorInfo, OperationKind, OperationState, StepState
from hostagent.journal.store import InvalidTransition, Journal, UnknownOperation
from tests.unit.hostagent.journal.helpers import CREATE, SNAP

# -- steps ---------------------------------------------------------------------------------


def test_steps_numbered_and_merged(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    s1 = journal.plan_step(op.id, "create_overlay", {"path": "/s/x"})
    assert journal.get(op.id).state is OperationState.RUNNING  # planning starts it
    s2 = journal.plan_step(op.id, "snapshot")
    assert (s1.seq, s2.seq) == (1, 2)
    assert s1.state is StepState.PLANNED
    done = journal.step_done(op.id, 1, {"size": 42})
    assert done.state is StepState.DONE
    assert done.data == {"path": "/s/x", "size": 42}
    failed = journal.step_failed(op.id, 2, ValueError("no guest agent"))
    assert failed.error == ErrorInfo("ValueError", "no guest agent")
    undone = journal.step_undone(op.id, 1, {"removed": True})
    assert undone.state is StepState.UNDONE
    assert [s.state for s in journal.steps(op.id)] == [StepState.UNDONE, StepState.FAILED]


def test_invalid_step_transitions(journal: Journal) -> None:
    op = journal.begin(OperationKind.BACKUP, {}).operation
    journal.plan_step(op.id, "a")
    journal.step_done(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_done(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_failed(op.id, 1, RuntimeError("x"))
    journal.step_undone(op.id, 1)
    with pytest.raises(InvalidTransition):
        journal.step_undone(op.id, 1)
    with pytest.raises(UnknownOperation):
        journal.step_done(op.id, 7)


def test_step_context_manager_success(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    with journal.step(op.id, "create_overlay", {"path": "/s/x"}) as s:
        # Written before the body runs: a crash here leaves a PLANNED trace.
        assert journal.steps(op.id)[0].state is StepState.PLANNED
        s.data["created"] = True
    (step,) = journal.steps(op.id)
    assert step.state is StepState.DONE
    assert step.data == {"path": "/s/x", "created": True}


def test_step_context_manager_failure(journal: Journal) -> None:
    op = journal.begin(OperationKind.ASSISTED_CREATE, CREATE, SNAP).operation
    with pytest.raises(OSError, match="disk full"), journal.step(op.id, "create_overlay"):
        raise OSError("disk full")
    (step,) = journal.steps(op.id)
    assert step.state is StepState.FAILED
    assert step.error == ErrorInfo("OSError", "disk full")


def test_step_context_manager_base_exception_leaves_planned(journal: Journal) -> None:
    op = journal.begin(OperationKind.BACKUP, {}).operation
    with pytest.raises(KeyboardInterrupt), journal.step(op.id, "copy"):
        raise KeyboardInterrupt
    assert journal.steps(op.id)[0].state is StepState.PLANNED


# -- durability across process death -------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from hostagent.journal.store import Journal
    from hostagent.journal.model import OperationKind

    path, how = sys.argv[1], sys.argv[2]
    j = Journal(path, host="child")
    op = j.begin(OperationKind.ASSISTED_CREATE, {"snapshot_id": "s"}, "s", locks=["v"]).operation
    with j.step(op.id, "create_overlay", {"path": "/share/x"}):
        pass
    j.plan_step(op.id, "snapshot", {"disk": "vda"})
    j.enqueue("s", "creating", "90%", op_id=op.id)
    print(op.id, flush=True)
    if how == "exit":
        os._exit(0)
    if how == "self-kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)  # "parent-kill": wait to be SIGKILLed mid-operation
    """
)


@pytest.mark.parametrize("how", ["exit", "self-kill", "parent-kill"])
def test_planned_step_survives_process_death(tmp_path: Path, how: str) -> None:
    path = str(tmp_path / "journal.db")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, path, how],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if how == "parent-kill":
        child.send_signal(signal.SIGKILL)
    rc = child.wait(timeout=60)
    assert rc == (0 if how == "exit" else -signal.SIGKILL)
    op_id = uuid.UUID(line.strip())

    journal = Journal(path, host="restarted")
    (record,) = journal.unfinished()
    assert record.operation.id == op_id
    assert record.operation.state is OperationState.RUNNING
    assert record.operation.host == "child"
    assert [(s.name, s.state) for s in record.steps] == [
        ("create_overlay", StepState.DONE),
        ("snapshot", StepState.PLANNED),
    ]
    assert record.steps[1].data == {"disk": "vda"}
    (note,) = journal.pending_notifications()
    assert (note.snapshot_id, note.status, note.progress) == ("s", "creating", "90%")
    # The restarted agent finishes the job where the dead one stopped.
    journal.step_done(op_id, 2)
    journal.finish(op_id, OperationState.SUCCEEDED)
    assert journal.unfinished() == []
