"""``qsnap-agent`` as a separate process on a real guest: assisted create/delete over RPC.

Cinder's side is a ``CinderRecorder`` (a tiny HTTP server standing in for Cinder's
``os-update_snapshot_status`` API) so the reports the agent sends can be asserted exactly;
the real-Cinder end to end belongs to the API issue. The overlay is pre-created exactly as
Cinder's remotefs driver does it (relative backing name), names go through the RPC edge.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI
from testbed.agent import CTX, final
from testbed.cinder import CinderRecorder
from testbed.layers import qemu_img_check
from tests.functional.hostagent.agent_bed import (
    assisted_agent,
    cinder_ledger,
    create,
    delete,
    precreate,
)

pytestmark = pytest.mark.functional


@pytest.fixture
def agent(rabbitmq: Any, share: Any, bed_dir: Path) -> Iterator[tuple[AgentAPI, CinderRecorder]]:
    cinder = CinderRecorder()
    agent = assisted_agent(bed_dir, rabbitmq, share, cinder, prefix="agent", merge_timeout=120)
    try:
        agent.start(timeout=60)
        yield agent.api, cinder
    finally:
        rc = agent.close()
        cinder.close()
    assert rc == 0, agent.tail()


def test_assisted_create_delete_and_bad_requests(agent: Any, guest: Any) -> None:
    client, cinder = agent
    g = guest
    vol, base = g.disks[0].volume_id, g.chain()[0]
    data = f"/data/before-{uuid.uuid4().hex[:6]}"
    g.check(["dd", "if=/dev/urandom", f"of={data}", "bs=64k", "count=4"], 60)
    digest = g.sha256(data)

    # 1. create: the pre-created overlay becomes the live top; Cinder hears creating/90%
    s1 = str(uuid.uuid4())
    f1 = precreate(g, s1)
    op = final(client, create(client, g, s1, f1))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert [(s["name"], s["state"]) for s in op.result["steps"]] == [
        ("validate", "done"), ("snapshot", "done"), ("notify", "done")
    ]  # fmt: skip
    assert g.chain() == [f1, base]
    assert cinder.updates == [(s1, {"status": "creating", "progress": "90%"})]
    again = create(client, g, s1, f1)  # Nova/Cinder retry: same operation, nothing redone
    assert again.id == op.id and g.chain() == [f1, base]
    cinder_ledger(g)  # Cinder heard 90%: its ledger maps s1 (deletes are checked against it)

    # 3. bad requests touch nothing and journal nothing
    listing = sorted(os.listdir(g.dir))
    ops_before = client.list_operations(CTX)
    s_bad = str(uuid.uuid4())
    with pytest.raises(api.VolumeNotFound):
        client.create_assisted_snapshot(
            CTX, str(uuid.uuid4()), {"snapshot_id": s_bad, "type": "qcow2", "new_file": f1}
        )
    with pytest.raises(api.InvalidRequest):
        create(client, g, s_bad, f"../volume-{vol}.{s_bad}")
    with pytest.raises(api.InvalidRequest):
        delete(client, g, s_bad, f"volume-{vol}.{uuid.uuid4()}", base)
    assert sorted(os.listdir(g.dir)) == listing
    assert [o.id for o in client.list_operations(CTX)] == [o.id for o in ops_before]
    assert g.chain() == [f1, base]

    # 2a. commit case: two snapshots, delete the older (middle file into base)
    s2 = str(uuid.uuid4())
    f2 = precreate(g, s2)
    assert final(client, create(client, g, s2, f2)).state is api.OperationState.SUCCEEDED
    assert g.chain() == [f2, f1, base]
    cinder_ledger(g)
    op = final(client, delete(client, g, s1, f1, base))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert [s["name"] for s in op.result["steps"]] == ["validate", "merge", "notify"]
    assert g.chain() == [f2, base]
    assert (g.dir / f1).exists()  # Cinder deletes it, never the agent
    assert cinder.updates[-1] == (s1, {"status": "deleting", "progress": "90%"})
    cinder_ledger(g)

    # 2b. pull case (Cinder's "active file is the snapshot's file"): flatten into the active
    op = final(client, delete(client, g, s2, None, None))
    assert op.state is api.OperationState.SUCCEEDED, op.error
    assert g.chain() == [f2]
    assert (g.dir / base).exists()
    assert cinder.updates[-1] == (s2, {"status": "deleting", "progress": "90%"})
    assert g.sha256(data) == digest
    qemu_img_check(g.dir / f2)
    assert hashlib.sha256(b"").hexdigest() != digest  # the file really had content
