"""The whole test bed as one context manager, for bench scripts and ``make demo``.

pytest uses the same classes through fixtures in ``tests/conftest.py``; outside pytest,
``with TestBed(share_kind="dir") as bed: g = bed.make_guest(ndisks=4)`` gives the same
guests and tears everything down (guests, share, RabbitMQ) on exit, even on errors.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

from testbed.guest import Guest, GuestFactory
from testbed.guestimage import build_guest_image
from testbed.host import LibvirtHost
from testbed.rabbit import RabbitNode
from testbed.shares import make_share


class TestBed:
    """Libvirt host + one share (+ RabbitMQ on request) + a guest factory."""

    __test__ = False  # not a pytest test class

    def __init__(self, share_kind: str = "dir", *, rabbitmq: bool = False) -> None:
        self._stack = ExitStack()
        self._share_kind = share_kind
        self._want_rabbit = rabbitmq
        self.rabbit: RabbitNode | None = None

    def __enter__(self) -> TestBed:
        try:
            self.image = build_guest_image()
            self.host = LibvirtHost()
            self._stack.callback(self.host.close)
            self.share = make_share(self._share_kind)
            self._stack.callback(self.share.close)
            if self._want_rabbit:
                self.rabbit = RabbitNode()
                self._stack.callback(self.rabbit.close)
            self.guests = GuestFactory(
                self.host.connection, self.image, lambda: self.share.new_dir("guest")
            )
            self._stack.callback(self.guests.close)
        except BaseException:
            self._stack.close()
            raise
        return self

    def make_guest(self, ndisks: int = 2, size_mib: int = 256, disk_fmt: str = "qcow2") -> Guest:
        return self.guests(ndisks=ndisks, size_mib=size_mib, share=self.share, disk_fmt=disk_fmt)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()
