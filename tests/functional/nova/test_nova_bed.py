"""The Nova peer itself: stock Nova keeps every record of a volume's active file in step.

Boot from a Cinder volume, attach a raw and a qcow2 volume, write markers, let Cinder take an
in-use snapshot of the root volume through Nova (os-assisted-volume-snapshots, the stock
path), then check that Nova's BDM, Cinder's attachment, os-initialize_connection, Cinder's
``.info`` and the live domain all name the new overlay, and that a hard reboot and a stop/start
(which rebuild the domain from the BDM) keep the guest on it with its data. This is the
baseline the qsnap-driven tests compare against.
"""

from __future__ import annotations

from testbed.nova import NovaCloud, Server


def _mountpoint(server: Server, volume_id: str) -> str:
    """Where the guest's init mounted this volume's disk at boot (found by virtio serial)."""
    dev = server.guest.device_of(volume_id)
    for line in server.guest.read_file("/proc/mounts").decode().splitlines():
        if line.split()[0] == dev:
            return str(line.split()[1])
    raise AssertionError(f"{dev} ({volume_id}) is not mounted in the guest")


def test_stock_nova_snapshot_reboot_keeps_overlay(nova_cloud: NovaCloud) -> None:
    cloud = nova_cloud
    srv = cloud.boot_server()
    root = srv.root_volume_id
    raw, qcow2 = cloud.create_volume(1, "raw"), cloud.create_volume(1, "qcow2")
    for vid, mnt in ((raw, "/mnt/raw"), (qcow2, "/mnt/qcow2")):
        cloud.attach(srv, vid)
        cloud.mount_volume(srv, vid, mnt)
        srv.guest.write_marker(f"{mnt}/marker", f"{vid}\n")
    srv.guest.write_marker("/data/before", "before\n")
    assert cloud.live_top(srv, raw) == (f"volume-{raw}", "raw")
    assert cloud.live_top(srv, qcow2) == (f"volume-{qcow2}", "qcow2")

    before = cloud.views(srv, root)
    assert set(before.values()) == {(f"volume-{root}", "raw")}, before

    snap = cloud.snapshot(root)
    overlay = (f"volume-{root}.{snap}", "qcow2")
    after = cloud.views(srv, root)
    assert after == dict.fromkeys(after, overlay), after
    # negative control: the comparison does see a record that still names the old file
    assert before["bdm"] != after["bdm"]
    for vid, fmt in ((raw, "raw"), (qcow2, "qcow2")):
        views = cloud.views(srv, vid)
        assert set(views.values()) == {(f"volume-{vid}", fmt)}, views

    srv.guest.write_marker("/data/after", "after\n")
    cloud.reboot_hard(srv)
    assert cloud.live_top(srv, root) == overlay
    assert cloud.bdm_connection_info(srv.id, root)["data"]["name"] == overlay[0]
    assert srv.guest.read_file("/data/before") == b"before\n"
    assert srv.guest.read_file("/data/after") == b"after\n"
    for vid in (raw, qcow2):
        assert srv.guest.read_file(f"{_mountpoint(srv, vid)}/marker") == f"{vid}\n".encode()

    cloud.stop(srv)
    assert cloud.server(srv.id)["status"] == "SHUTOFF"
    cloud.start(srv)
    assert cloud.views(srv, root) == dict.fromkeys(after, overlay)
    assert srv.guest.read_file("/data/after") == b"after\n"
