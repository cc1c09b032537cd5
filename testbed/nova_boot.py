"""The bootable volume image for the Nova peer (built once, cached beside the guest image).

There is no Glance in the bed: Nova boots from a Cinder volume whose file we fill with this
image. It is the bed's guest (same initramfs: busybox, qemu-ga, record writer) made
BIOS-bootable: a small partitionless ext4 holding the kernel as a bzImage (syslinux cannot load
the unpacked ELF kernel the direct-boot guest uses), the initramfs and extlinux. SeaBIOS boots
it; the guest's init then mounts the same filesystem (vda) as /data, where tests write markers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed import guestimage
from testbed.guestimage import GuestImage

SIZE_MIB = 64
EXTLINUX_CONF = f"DEFAULT qsnap\nLABEL qsnap\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND {guestimage.CMDLINE}\n"  # noqa: E501


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{argv!r} failed rc={res.returncode}: {res.stderr.strip()}")


def _bzimage(image: GuestImage, work: Path) -> Path:
    """The kernel package's bzImage (the guest image keeps only the unpacked ELF kernel)."""
    manifest = json.loads((image.kernel.parent / "manifest.json").read_text())
    if manifest.get("kernel_format") == "bzImage":
        return image.kernel
    name, version, kver = manifest["kernel_package"], manifest["kernel_version"], manifest["kver"]
    deb = guestimage._kernel_deb(image.kernel.parent.parent, name, version)
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True)
    _run_input(["tar", "-x", "-C", str(work), f"./boot/vmlinuz-{kver}"], tar.stdout)
    return work / "boot" / f"vmlinuz-{kver}"


def _run_input(argv: list[str], data: bytes) -> None:
    res = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{argv!r} failed: {res.stderr.decode(errors='replace').strip()}")


def _build(image: GuestImage, final: Path) -> None:
    """Stage the tree, ``mkfs.ext4 -d`` it, loop-mount it for ``extlinux --install``."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".nova-boot-"))
    try:
        root = tmp / "root"
        (root / "boot").mkdir(parents=True)
        shutil.copyfile(_bzimage(image, tmp), root / "boot" / "vmlinuz")
        shutil.copyfile(image.initrd, root / "boot" / "initrd.img")
        (root / "boot" / "extlinux.conf").write_text(EXTLINUX_CONF)
        img = tmp / "boot.img"
        with open(img, "wb") as f:
            f.truncate(SIZE_MIB << 20)
        # no journal, no checksums, 32-bit: what extlinux 6.04 reads; files are copied in
        # through a mount (syslinux failed with an I/O error on a ``mkfs.ext4 -d`` tree)
        _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal,^metadata_csum,^64bit",
              "-L", "qsnap-boot", str(img)])  # fmt: skip
        mnt = tmp / "mnt"
        mnt.mkdir()
        _run(["mount", "-o", "loop", str(img), str(mnt)])
        try:
            shutil.copytree(root / "boot", mnt / "boot")
            _run(["extlinux", "--install", str(mnt / "boot")])
        finally:
            _run(["umount", str(mnt)])
        img.chmod(0o644)
        os.replace(img, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def boot_image(image: GuestImage) -> Path:
    """The cached bootable image for this guest image (built under the guest cache lock)."""
    cache = image.kernel.parent.parent
    key = hashlib.sha256(image.key.encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    final = cache / f"nova-boot-{key}.img"
    if not final.exists():
        with guestimage._locked(cache / ".nova-boot.lock"):
            if not final.exists():
                if shutil.which("extlinux") is None:
                    raise RuntimeError("extlinux is missing: run tools/nova_setup.sh")
                _build(image, final)
                for old in cache.glob("nova-boot-*.img"):  # images of older inputs
                    if old != final:
                        old.unlink(missing_ok=True)
    return final
