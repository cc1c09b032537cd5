"""RPC 1.3 round trip over oslo.messaging ``fake://``: AgentAPI -> AgentEndpoint -> the real
AssistedService on the test_backup_service bed; typed errors come back as themselves."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from hostagent.config import make_conf
from hostagent.rpc import contract as api
from hostagent.rpc.client import AgentAPI, get_transport
from hostagent.rpc.server import AgentEndpoint, get_server
from tests.unit.hostagent.fakes import VOL as V1
from tests.unit.hostagent.fakes import BackupBed as Bed
from tests.unit.hostagent.fakes import expected as _expected

CTX = {"request_id": "req-cancel"}


def test_cancel_and_start_prune_round_trip(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    for _ in range(2):
        bed.create([V1])
    conf = make_conf(overrides={"transport_url": "fake://", "host": "h"})
    transport = get_transport(conf)
    server = get_server(transport, "h", bed.svc)
    server.start()
    try:
        client = AgentAPI(transport, "h", timeout=30)
        op = client.start_prune(CTX, keep_last=1, keep_daily=None, volume_id=V1, dry_run=False)
        assert op.kind is api.OperationKind.BACKUP
        deadline = time.monotonic() + 30
        while op.state in (api.OperationState.QUEUED, api.OperationState.RUNNING):
            assert time.monotonic() < deadline
            time.sleep(0.05)
            op = client.get_operation(CTX, op.id)
        assert op.state is api.OperationState.SUCCEEDED and len(op.result["deleted"]) == 1
        with pytest.raises(api.NotCancellable, match="already ended: succeeded"):
            client.cancel_operation(CTX, op.id)
        with pytest.raises(api.OperationNotFound):
            client.cancel_operation(CTX, str(uuid.uuid4()))
        with pytest.raises(api.InvalidRequest):
            client.start_prune(CTX, keep_last=0, keep_daily=0, volume_id=None, dry_run=False)
        assert len(bed.svc.list_backups(api.CallContext(), V1)) == 1
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
    # the endpoint refuses a non-string id without asking the service; a bad string is 404
    ep = AgentEndpoint(bed.svc)
    assert isinstance(_expected(lambda: ep.cancel_operation({}, 7)), api.InvalidRequest)
    assert isinstance(_expected(lambda: ep.cancel_operation({}, "../x")), api.OperationNotFound)
    assert ep.target.version == "1.5"
