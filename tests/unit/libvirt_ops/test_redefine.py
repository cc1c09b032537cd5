"""retarget_inactive_disks on libvirt's test driver: shut-off definitions naming a merged-away
overlay are moved to its backing file; running domains and other disks are left alone."""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest
from lxml import etree

from libvirt_ops import Connection, retarget_inactive_disks

OLD = "/srv/share/volume-11111111-2222-4333-8444-555555555555.qsnap-bk-x"
NEW = "/srv/share/volume-11111111-2222-4333-8444-555555555555"
OTHER = "/srv/share/volume-99999999-2222-4333-8444-555555555555"


def _xml(name: str, *sources: str) -> str:
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{s}'/><backingStore type='file'><format type='raw'/>"
        f"<source file='{NEW}'/></backingStore><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i, s in enumerate(sources)
    )
    return (
        f"<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>"
        f"<os><type>hvm</type></os><devices>{disks}</devices></domain>"
    )


@pytest.fixture
def conn() -> Iterator[Connection]:
    c = Connection("test:///default")
    yield c
    c.close()


def _sources(dom: libvirt.virDomain) -> list[tuple[str | None, str | None, int]]:
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    return [
        (d.find("source").get("file"), d.find("driver").get("type"), len(d.findall("backingStore")))
        for d in root.iterfind("./devices/disk")
    ]


def test_only_shut_off_definitions_naming_the_file_move(conn: Connection) -> None:
    c = conn.get()
    off = c.defineXML(_xml("qsnap-off", OLD, OTHER))
    running = c.defineXML(_xml("qsnap-running", OLD))
    running.create()
    unrelated = c.defineXML(_xml("qsnap-unrelated", OTHER))
    try:
        assert retarget_inactive_disks(conn, OLD, NEW, "raw") == ["qsnap-off"]
        assert _sources(off) == [(NEW, "raw", 0), (OTHER, "qcow2", 1)]
        assert _sources(running)[0][0] == OLD  # a guest using it is never redefined here
        assert _sources(unrelated) == [(OTHER, "qcow2", 1)]
        assert retarget_inactive_disks(conn, OLD, NEW, "raw") == []  # idempotent
    finally:
        running.destroy()
        for d in (off, running, unrelated):
            d.undefine()
