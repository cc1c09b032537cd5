"""The test bed itself, on both share kinds: boot, agent, data, freeze, shutdown, RabbitMQ."""

from __future__ import annotations

import hashlib
import os
import time

import libvirt
import pytest

from testbed.disks import fsck_clean, read_guest_file
from testbed.records import parse_records

pytestmark = pytest.mark.functional


def _wait_records(guest, mount: str, at_least: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        log = guest.records(mount)
        if log.count >= at_least:
            return log
        assert time.monotonic() < deadline, f"writer on {mount} wrote only {log.count} records"
        time.sleep(0.2)


def test_guest_boots_and_answers_ping(guest) -> None:
    assert guest.agent("guest-ping") == {}
    mounts = guest.read_file("/proc/mounts").decode()
    for disk in guest.disks:
        assert f" {disk.mountpoint} ext4 " in mounts, mounts
    # The domain really has our volumes, with serials, on this share.
    xml = guest.dom.XMLDesc(0)
    for disk in guest.disks:
        assert f"<serial>{disk.volume_id}</serial>" in xml
        assert str(disk.path) in xml
        assert disk.path.name == f"volume-{disk.volume_id}"


def test_data_written_in_guest_reads_back(guest) -> None:
    payload = os.urandom(300_000)
    guest.write_file("/data2/blob", payload)
    assert guest.read_file("/data2/blob") == payload
    out = guest.check(["sha256sum", "/data2/blob"]).decode().split()[0]
    assert out == hashlib.sha256(payload).hexdigest()


def test_fsfreeze_stalls_writer_and_thaw_resumes(guest) -> None:
    guest.start_writers(interval_ms=10, sync_every=1)
    before = _wait_records(guest, "/data", 20)
    t_guest_start = guest.guest_time_ns()
    guest.dom.fsFreeze()
    t_frozen = time.monotonic()
    assert guest.agent("guest-fsfreeze-status") == "frozen"
    time.sleep(1.5)
    frozen_for_ns = int((time.monotonic() - t_frozen) * 1e9)
    guest.dom.fsThaw()
    assert guest.agent("guest-fsfreeze-status") == "thawed"
    t_guest_thawed = guest.guest_time_ns()
    after = _wait_records(guest, "/data", before.count + 20)
    guest.stop_writers()
    final = guest.records("/data")
    for mount in [d.mountpoint for d in guest.disks]:
        log = guest.records(mount)
        assert log.clean, (mount, log.problems)
    assert before.is_prefix_of(after) and after.is_prefix_of(final)
    # The writer could not write while frozen: its records show one gap at least as long
    # as the freeze, inside the window, and records again after the thaw.
    gap = final.max_gap_ns(t_guest_start, t_guest_thawed + 1_000_000_000)
    assert gap >= frozen_for_ns * 0.9, (gap, frozen_for_ns)
    assert final.count_between(t_guest_thawed, final.times_ns[-1] + 1) > 0
    assert len(final.gaps_over(frozen_for_ns // 2)) == 1


def test_clean_shutdown(guest) -> None:
    guest.start_writers(interval_ms=10, sync_every=5)
    _wait_records(guest, "/data", 10)
    detail = guest.shutdown(timeout=60)
    assert detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    assert not guest.is_running()
    for disk in guest.disks:
        res = fsck_clean(disk.path, disk.fmt)
        assert res.ok and not res.needs_recovery, res.output
    log = parse_records(read_guest_file(guest.disks[0].path, "qcow2", "/records"))
    assert log.clean and log.count >= 10, log.problems


def test_rabbitmq_rpc_round_trip(rabbitmq) -> None:
    """A real oslo.messaging RPC call through the private node (threading executor)."""
    import threading

    from oslo_service import backend

    try:
        backend.init_backend(backend.BackendType.THREADING)
    except backend.exceptions.BackendAlreadySelected:
        pass
    import oslo_messaging as messaging
    from oslo_config import cfg
    from oslo_messaging.conffixture import ConfFixture

    conf = cfg.ConfigOpts()
    # oslo.messaging registers its tracing/metrics options only on the global cfg.CONF;
    # ConfFixture's constructor registers all of them on a private ConfigOpts.
    ConfFixture(conf)
    conf([], project="qsnap-test")
    transport = messaging.get_rpc_transport(conf, url=rabbitmq.transport_url)
    target = messaging.Target(topic="bedtest", server="h1")

    class Endpoint:
        def echo(self, ctxt, value):
            return {"value": value, "thread": threading.current_thread().name}

    server = messaging.get_rpc_server(transport, target, [Endpoint()], executor="threading")
    server.start()
    try:
        client = messaging.get_rpc_client(transport, messaging.Target(topic="bedtest"), timeout=30)
        out = client.prepare(server="h1").call({}, "echo", value=[1, "x"])
        assert out["value"] == [1, "x"]
    finally:
        server.stop()
        server.wait()
        transport.cleanup()
