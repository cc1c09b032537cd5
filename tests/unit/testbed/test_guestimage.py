"""The guest image: module ordering and cpio format (fast), and a real boot without libvirt.

The boot test proves what the libvirt fixtures rely on: the agent answers on
org.qemu.guest_agent.0, every disk is mounted, writers produce a clean record log that can be
read back through the agent, fsinfo maps mounts to disk serials, and guest-shutdown powers off.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import guestimage
from testbed.disks import create_volume, fsck_clean, image_sha256, read_guest_file
from testbed.records import parse_records

TEST_ROOT = Path("/var/lib/qsnap-test")

MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
"""


def test_module_order_puts_every_dependency_first() -> None:
    order = guestimage.module_load_order(MODULES_DEP, guestimage.MODULES)
    names = [guestimage._modname(p) for p in order]
    assert len(names) == len(set(names)) == 7
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_pci")
    assert names.index("virtio_pci_modern_dev") < names.index("virtio_pci")
    assert names[-2:] == ["virtio_blk", "virtio_console"]
    assert "kernel/drivers/block/virtio_blk.ko.zst" in order


def test_module_missing_from_modules_dep_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="virtio_net"):
        guestimage.module_load_order(MODULES_DEP, ("virtio_net",))


@pytest.mark.parametrize("tool", ["zstd", "xz", "gzip", None])
def test_modules_are_stored_uncompressed(tmp_path: Path, tool: str | None) -> None:
    body = b"\x7fELF fake module " * 100
    ko = tmp_path / "m.ko"
    ko.write_bytes(body)
    if tool is not None:
        subprocess.run([tool, "-q", str(ko)], check=True)
        (ko,) = tmp_path.glob("m.ko.*")
    assert guestimage._ko_bytes(ko) == body


def test_pvh_extraction_falls_back_on_anything_else() -> None:
    assert guestimage.extract_pvh_vmlinux(b"MZ no payload here" * 100) is None
    if shutil.which("lz4"):  # without lz4 the builder never tries: nothing more to check
        # An LZ4 frame that decompresses to something that is not a PVH ELF kernel.
        lz4 = subprocess.run(["lz4", "-l", "-c"], input=b"not elf" * 999, capture_output=True)
        assert guestimage.extract_pvh_vmlinux(b"\0" * 512 + lz4.stdout) is None
    assert not guestimage._has_pvh_note(b"\x7fELF\x02" + b"\0" * 100)


def test_cpio_is_readable_by_cpio_tool(tmp_path: Path) -> None:
    c = guestimage.Cpio()
    c.file("usr/bin/x", b"hello", 0o755)
    c.symlink("bin/y", "/usr/bin/x")
    c.chardev("dev/console", 5, 1)
    c.file("usr/bin/x", b"ignored duplicate")
    (tmp_path / "a.cpio").write_bytes(c.finish())
    listing = subprocess.run(
        ["cpio", "-itv", "-F", str(tmp_path / "a.cpio")], capture_output=True, text=True, check=True
    ).stdout
    lines = listing.splitlines()
    assert [ln.split()[-1] for ln in lines if "->" not in ln] == [
        "usr",
        "usr/bin",
        "usr/bin/x",
        "bin",
        "dev",
        "dev/console",
    ]
    assert any(ln.startswith("l") and ln.endswith("bin/y -> /usr/bin/x") for ln in lines)
    assert any(ln.startswith("c") and "5,   1" in ln for ln in lines)
    subprocess.run(["cpio", "-id", "-F", str(tmp_path / "a.cpio")], cwd=tmp_path, check=True)
    assert (tmp_path / "usr/bin/x").read_bytes() == b"hello"


def test_key_follows_guest_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "guest"
    shutil.copytree(guestimage.GUEST_SRC, src)
    monkeypatch.setattr(guestimage, "GUEST_SRC", src)
    key1, kpkg = guestimage._input_key(guestimage.DEFAULT_CACHE)
    assert kpkg[0].startswith("linux-image-") and kpkg[0].endswith("-cloud-amd64")
    (src / ".init.swp").write_bytes(b"editor state")
    assert guestimage._input_key(guestimage.DEFAULT_CACHE)[0] == key1
    (src / "init").write_bytes((src / "init").read_bytes() + b"# changed\n")
    assert guestimage._input_key(guestimage.DEFAULT_CACHE)[0] != key1


# --- a real boot ----------------------------------------------------------------------------


class Agent:
    """Just enough of the qemu-ga wire protocol (JSON lines over the chardev socket)."""

    def __init__(self, path: Path, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.buf = b""

    def sync(self, deadline_s: float) -> None:
        """guest-sync-delimited until the agent answers; skip anything before its 0xFF."""
        end = time.monotonic() + deadline_s
        sync_id = 0
        while True:
            sync_id += 1
            msg = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            self.sock.sendall(b"\xff" + json.dumps(msg).encode())
            self.sock.settimeout(0.5)
            try:
                while True:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise EOFError("agent socket closed")
                    self.buf += chunk
                    i = self.buf.rfind(b"\xff")
                    if i >= 0 and b"\n" in self.buf[i:]:
                        line, self.buf = self.buf[i + 1 :].split(b"\n", 1)
                        if json.loads(line).get("return") == sync_id:
                            self.sock.settimeout(60)
                            return
            except TimeoutError:
                if time.monotonic() > end:
                    raise

    def send(self, name: str, **args: Any) -> None:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def call(self, name: str, **args: Any) -> Any:
        self.send(name, **args)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("agent socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]

    def run(self, *argv: str, deadline_s: float = 30) -> tuple[int, str]:
        pid = self.call("guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True})
        end = time.monotonic() + deadline_s
        while True:
            st = self.call("guest-exec-status", pid=pid["pid"])
            if st["exited"]:
                return st["exitcode"], base64.b64decode(st.get("out-data", "")).decode()
            assert time.monotonic() < end, f"{argv} still running"
            time.sleep(0.05)

    def clock_offset(self) -> tuple[int, int]:
        """(guest minus host CLOCK_REALTIME ns, uncertainty ns) from one guest-get-time."""
        before = time.time_ns()
        guest = int(self.call("guest-get-time"))
        after = time.time_ns()
        return guest - (before + after) // 2, (after - before) // 2 + 1

    def read_file(self, path: str) -> bytes:
        handle = self.call("guest-file-open", path=path, mode="r")
        data = b""
        try:
            while True:
                r = self.call("guest-file-read", handle=handle, count=1 << 20)
                data += base64.b64decode(r["buf-b64"])
                if r["eof"]:
                    return data
        finally:
            self.call("guest-file-close", handle=handle)


@pytest.fixture
def booted() -> Iterator[tuple[Agent, subprocess.Popen[bytes], list[str], Path]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: run the host setup")
    img = guestimage.build_guest_image()
    work = TEST_ROOT / f"guestimage-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, mode=0o755)
    vols = [str(uuid.uuid4()) for _ in range(2)]
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256", "-display", "none",
        "-no-reboot", "-serial", f"file:{work / 'console.log'}",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", img.cmdline,
        "-device", "virtio-serial",
        "-chardev", f"socket,path={work / 'qga.sock'},server=on,wait=off,id=qga0",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    for i, vol in enumerate(vols):
        path = create_volume(work, vol, size_mib=64)
        argv += ["-drive", f"file={path},if=none,id=d{i},format=qcow2"]
        argv += ["-device", f"virtio-blk-pci,drive=d{i},serial={vol}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv)
    try:
        agent = Agent(work / "qga.sock", deadline_s=30)
        agent.sync(deadline_s=120)
        print(f"boot-to-agent {time.monotonic() - t0:.2f} s", file=sys.stderr)
        yield agent, proc, vols, work
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.functional
def test_guest_boots_writes_records_and_powers_off(
    booted: tuple[Agent, subprocess.Popen[bytes], list[str], Path],
) -> None:
    agent, proc, vols, work = booted
    assert agent.call("guest-ping") == {}
    rc, mounts = agent.run("cat", "/proc/mounts")
    assert rc == 0
    assert "/dev/vda /data ext4" in mounts and "/dev/vdb /data2 ext4" in mounts

    # virtio-blk carries at most 20 bytes of serial (VIRTIO_BLK_ID_BYTES): the guest sees a
    # prefix of the volume uuid Nova sets as <serial>.
    fsinfo = {fs["mountpoint"]: fs for fs in agent.call("guest-get-fsinfo")}
    assert [d["serial"] for d in fsinfo["/data"]["disk"]] == [vols[0][:20]]
    assert [d["serial"] for d in fsinfo["/data2"]["disk"]] == [vols[1][:20]]
    assert fsinfo["/data"]["disk"][0]["pci-controller"]["slot"] > 0

    rc, out = agent.run("qsnap-writers-start", "10", "1")
    assert rc == 0 and out.count("started writer") == 2, out
    time.sleep(1.5)
    vol0 = work / f"volume-{vols[0]}"
    # Guest time is unavailable while frozen: map host times of "frozen" and "about to
    # thaw" onto the guest clock, shrunk by the mapping's uncertainty.
    windows: list[tuple[str, int, int]] = []  # (mounts frozen, host ns frozen, host ns thaw)
    off_before = agent.clock_offset()
    assert agent.call("guest-fsfreeze-freeze") == 2
    try:
        t_frozen = time.time_ns()
        # Frozen ext4 has flushed its journal: the image is a clean point in time.
        frozen_fsck = fsck_clean(vol0, "qcow2")
        frozen_log = parse_records(read_guest_file(vol0, "qcow2", "/records"))
        time.sleep(0.5)
        windows.append(("/data /data2", t_frozen, time.time_ns()))
    finally:
        assert agent.call("guest-fsfreeze-thaw") == 2
    assert frozen_fsck.ok and not frozen_fsck.needs_recovery, frozen_fsck.output
    assert frozen_log.clean and frozen_log.count > 0, frozen_log.problems
    time.sleep(0.5)
    # Freeze only /data2: its writer stalls a second time, /data's does not.
    assert agent.call("guest-fsfreeze-freeze-list", mountpoints=["/data2"]) == 1
    try:
        t_frozen = time.time_ns()
        time.sleep(0.5)
        windows.append(("/data2", t_frozen, time.time_ns()))
    finally:
        assert agent.call("guest-fsfreeze-thaw") == 1
    off_after = agent.clock_offset()
    offset = (off_before[0] + off_after[0]) // 2
    slack = max(off_before[1], off_after[1]) + abs(off_before[0] - off_after[0]) + 20_000_000
    time.sleep(0.5)
    rc, out = agent.run("qsnap-writers-stop")
    assert rc == 0 and out.count("stopped writer") == 2, out

    logs = {m: parse_records(agent.read_file(f"{m}/records")) for m in ("/data", "/data2")}
    for mnt, log in logs.items():
        assert log.clean, log.problems
        assert log.count > 10
        for frozen, h0, h1 in windows:
            t0, t1 = h0 + offset + slack, h1 + offset - slack
            assert t1 - t0 > 200_000_000, "clock mapping too uncertain"
            # Frozen: at most the one record stamped before write() blocked. Not frozen:
            # the writer kept its cadence (10 ms here; TCG on a busy host is slower).
            if mnt in frozen.split():
                assert log.count_between(t0, t1) <= 1
                assert log.max_gap_ns(t0, t1) >= (t1 - t0) // 2
            else:
                assert log.count_between(t0, t1) >= 3
    assert frozen_log.is_prefix_of(logs["/data"]) and frozen_log.count < logs["/data"].count

    # Restarting continues the same log; a writer that cannot start is reported.
    rc, out = agent.run("qsnap-writers-start", "5", "4", "/data", "/nonexistent")
    assert rc == 1 and "started writer" in out and "/nonexistent died" in out, out
    time.sleep(0.5)
    assert agent.run("qsnap-writers-stop")[0] == 0
    resumed = parse_records(agent.read_file("/data/records"))
    assert resumed.clean and logs["/data"].is_prefix_of(resumed), resumed.problems
    assert resumed.count > logs["/data"].count
    logs["/data"] = resumed

    rc, ps = agent.run("ps", "-o", "stat,comm")
    assert rc == 0 and "qsnap-writer" not in ps
    assert not [ln for ln in ps.splitlines() if ln.lstrip().startswith("Z")], ps

    agent.send("guest-shutdown")  # no reply: the guest powers off
    assert proc.wait(timeout=60) == 0
    console = (work / "console.log").read_text(errors="replace")
    assert "QSNAP-GUEST-READY" in console
    assert "qsnap-shutdown: poweroff" in console

    # The shutdown wrapper unmounted: journal clean, same records from the host side.
    after = fsck_clean(vol0, "qcow2")
    assert after.ok and not after.needs_recovery, after.output
    assert parse_records(read_guest_file(vol0, "qcow2", "/records")) == logs["/data"]
    assert image_sha256(vol0, "qcow2") == image_sha256(vol0, "qcow2")
    assert image_sha256(vol0, "qcow2") != image_sha256(work / f"volume-{vols[1]}", "qcow2")


def test_disk_helpers_roundtrip(tmp_path: Path) -> None:
    vol = str(uuid.uuid4())
    raw = create_volume(tmp_path, vol, size_mib=16, fmt="raw")
    assert raw.name == f"volume-{vol}" and raw.stat().st_mode & 0o777 == 0o644
    (tmp_path / "src").write_bytes(b"guest data\n" * 1000)
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {tmp_path / 'src'} f", str(raw)],
        check=True,
        capture_output=True,
    )
    qcow = tmp_path / "copy.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
    )
    assert read_guest_file(qcow, "qcow2", "/f") == b"guest data\n" * 1000
    assert image_sha256(qcow, "qcow2") == image_sha256(raw, "raw")
    res = fsck_clean(qcow, "qcow2")
    assert res.ok and not res.needs_recovery
    with pytest.raises(FileNotFoundError):
        read_guest_file(qcow, "qcow2", "/missing")
    # A crash-consistent (unquiesced) copy shows up as a journal that needs recovery.
    for req in ("feature needs_recovery", "feature -needs_recovery", "freei /f"):
        subprocess.run(["debugfs", "-w", "-R", req, str(raw)], check=True, capture_output=True)
        if req == "feature needs_recovery":
            assert fsck_clean(raw, "raw").needs_recovery
    bad = fsck_clean(raw, "raw")
    assert not bad.ok and not bad.needs_recovery and "bitmap differences" in bad.output.lower()
    with pytest.raises(ValueError):
        create_volume(tmp_path, "../etc")
