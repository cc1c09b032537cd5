"""Persistent domain definitions that still name a file about to be merged away.

libvirt records an external snapshot's overlay in a persistent domain's definition too, so
a domain that was shut off while an overlay was its top would be started on that overlay
again. When the agent merges such an overlay offline, every defined-but-not-running domain
naming it must name its backing file instead, or its next start fails on a missing file.
"""

from __future__ import annotations

import os

import libvirt
from lxml import etree

from libvirt_ops._connection import Connection

_INACTIVE = libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE  # keep secrets on redefine


def _retarget(xml: str, old: str, new: str, new_fmt: str) -> str | None:
    """``xml`` with every file disk sourced at ``old`` moved to ``new``; None if none is."""
    root = etree.fromstring(xml.encode())
    hit = False
    for disk in root.iterfind("./devices/disk[@type='file']"):
        src = disk.find("source")
        if src is None or os.path.realpath(src.get("file", "")) != old:
            continue
        src.set("file", new)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", new_fmt)
        for stale in disk.findall("backingStore"):  # libvirt re-reads the chain at start
            disk.remove(stale)
        hit = True
    return etree.tostring(root, encoding="unicode") if hit else None


def retarget_inactive_disks(
    conn: Connection, old_path: str, new_path: str, new_fmt: str
) -> list[str]:
    """Redefine every shut-off persistent domain whose disk names ``old_path`` so it names
    ``new_path`` (format ``new_fmt``) instead; returns their names. Running domains are left
    alone: their live chain is the caller's business (never merge a file a guest uses)."""
    old = os.path.realpath(old_path)
    c = conn.get()
    changed: list[str] = []
    for dom in c.listAllDomains(_INACTIVE):
        xml = _retarget(dom.XMLDesc(_XML), old, new_path, new_fmt)
        if xml is not None:
            c.defineXML(xml)
            changed.append(dom.name())
    return changed
