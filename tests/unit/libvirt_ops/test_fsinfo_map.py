"""Joining guest-get-fsinfo with the domain XML: serial (cut to 20 bytes), then PCI."""

from __future__ import annotations

from typing import Any

from libvirt_ops._agent import agent_connected, map_fsinfo

V1 = "6393e3f2-e694-4c3b-8207-17fa0d8607e5"
V2 = "5f819bfa-6442-4ceb-a001-000000000002"

XML = f"""<domain><devices>
  <disk type='file' device='disk'><source file='/s/volume-{V1}'/><target dev='vda'/>
    <serial>{V1}</serial>
    <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/></disk>
  <disk type='file' device='disk'><source file='/s/volume-{V2}'/><target dev='vdb'/>
    <serial>{V2}</serial>
    <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></disk>
  <disk type='file' device='disk'><source file='/s/x'/><target dev='vdc'/>
    <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>
  <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
  </channel>
</devices></domain>"""


def _fs(mount: str, *disks: dict[str, Any]) -> dict[str, Any]:
    return {"mountpoint": mount, "name": mount, "type": "ext4", "disk": list(disks)}


def _pci(bus: int) -> dict[str, int]:
    return {"domain": 0, "bus": bus, "slot": 0, "function": 0}


def test_truncated_serial_matches_its_volume() -> None:
    got = map_fsinfo(
        [_fs("/data", {"serial": V1[:20], "bus-type": "virtio", "pci-controller": _pci(9)})], XML
    )
    assert got[0].targets == ("vda",)
    assert got[0].mapped


def test_pci_address_when_no_serial() -> None:
    got = map_fsinfo([_fs("/data3", {"bus-type": "virtio", "pci-controller": _pci(4)})], XML)
    assert got[0].targets == ("vdc",)


def test_unknown_disk_is_unmapped() -> None:
    got = map_fsinfo(
        [_fs("/x", {"serial": "nope", "bus-type": "virtio", "pci-controller": _pci(7)})], XML
    )
    assert not got[0].mapped
    assert got[0].targets == ()


def test_filesystem_without_disks_is_unmapped() -> None:
    assert not map_fsinfo([_fs("/x")], XML)[0].mapped


def test_spanning_filesystem_lists_both_disks() -> None:
    got = map_fsinfo([_fs("/lvm", {"serial": V2[:20]}, {"serial": V1})], XML)
    assert got[0].targets == ("vdb", "vda")
    assert got[0].mapped


class _Dom:
    def __init__(self, xml: str) -> None:
        self.xml = xml

    def XMLDesc(self, _flags: int) -> str:
        return self.xml


def test_agent_connected_reads_channel_state() -> None:
    assert agent_connected(_Dom(XML))  # type: ignore[arg-type]
    assert not agent_connected(_Dom(XML.replace("state='connected'", "state='disconnected'")))  # type: ignore[arg-type]
