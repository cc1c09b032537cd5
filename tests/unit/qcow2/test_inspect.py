"""Hostile images are refused by inspect_chain with UnsafeImage naming the file and rule.

Images qemu-img will make are made with qemu-img; the rest are written with struct
(``write_qcow2``). Each test asserts the rule, so a rejection for the wrong reason fails.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

import qcow2._inspect as inspect_mod
from qcow2 import UnsafeImage, inspect_chain, open_chain
from tests.unit.qcow2.corpus import Image, corpus, run, snap, vol, write_qcow2

__all__ = ["corpus"]

A = vol("a")
B = vol("b")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "share"
    r.mkdir()
    return r


def _rule(path: Path, root: Path, **kw: object) -> UnsafeImage:
    with pytest.raises(UnsafeImage) as ei:
        inspect_chain(path, roots=[root], **kw)  # type: ignore[arg-type]
    return ei.value


def _qemu_create(root: Path, name: str, *args: str) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", *args, name, "1M"], cwd=root)
    return root / name


def test_every_corpus_image_passes(corpus: dict[str, Image]) -> None:
    for img in corpus.values():
        chain = inspect_chain(img.path, roots=[Path(img.path).parent], fmt=img.fmt)
        assert len(chain.layers) == img.layers
        assert chain.layers[-1].backing_name is None


def test_data_file_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-o", f"data_file={root / 'host-file'}")
    err = _rule(p, root)
    assert err.rule == "data-file" and err.path == str(p)


def test_data_file_bit_without_extension_rejected(root: Path) -> None:
    write_qcow2(root / A, incompatible=1 << 2)
    assert _rule(root / A, root).rule == "data-file"


def test_absolute_backing_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-u", "-b", "/etc/passwd", "-F", "raw")
    assert _rule(p, root).rule == "absolute-backing"


def test_json_backing_rejected(root: Path) -> None:
    spec = 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}'
    p = _qemu_create(root, A, "-u", "-b", spec, "-F", "raw")
    assert _rule(p, root).rule == "json-backing"


def test_protocol_backing_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-u", "-b", "nbd:localhost:10809", "-F", "raw")
    assert _rule(p, root).rule == "protocol-backing"


def test_dotdot_backing_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-u", "-b", f"../{B}", "-F", "qcow2")
    assert _rule(p, root).rule == "dotdot"


def test_subdir_backing_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-u", "-b", f"sub/{B}", "-F", "qcow2")
    assert _rule(p, root).rule == "backing-path"


def test_backing_name_outside_convention_rejected(root: Path) -> None:
    p = _qemu_create(root, A, "-u", "-b", "passwd", "-F", "raw")
    assert _rule(p, root).rule == "backing-name"


def test_backing_without_recorded_format_rejected(root: Path) -> None:
    write_qcow2(root / A, backing=B, backing_fmt=None)
    write_qcow2(root / B)
    assert _rule(root / A, root).rule == "backing-format"


def test_backing_format_not_allowed(root: Path) -> None:
    write_qcow2(root / A, backing=B, backing_fmt="vmdk")
    write_qcow2(root / B)
    assert _rule(root / A, root).rule == "backing-format"


def test_symlink_escape_of_backing_rejected(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"secret" * 100)
    (root / B).symlink_to(outside)
    p = _qemu_create(root, A, "-u", "-b", B, "-F", "raw")
    err = _rule(p, root)
    assert err.rule == "symlink-escape" and err.path == str(root / B)


def test_symlink_escape_of_top_rejected(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / A
    write_qcow2(outside)
    (root / A).symlink_to(outside)
    assert _rule(root / A, root).rule == "symlink-escape"


def test_top_outside_roots_and_dotdot_rejected(root: Path, tmp_path: Path) -> None:
    write_qcow2(tmp_path / A)
    assert _rule(tmp_path / A, root).rule == "outside-roots"
    dotted = Path(f"{root}/../{A}")
    assert _rule(dotted, tmp_path).rule == "dotdot"


def test_loop_rejected(root: Path) -> None:
    write_qcow2(root / A, backing=B)
    write_qcow2(root / B, backing=A)
    assert _rule(root / A, root).rule == "loop"
    write_qcow2(root / A, backing=A)
    assert _rule(root / A, root).rule == "loop"


def test_missing_and_fifo_backing_rejected(root: Path) -> None:
    write_qcow2(root / A, backing=B)
    assert _rule(root / A, root).rule == "missing"
    os.mkfifo(root / B)
    assert _rule(root / A, root).rule == "not-regular"  # and no hang on open


def test_ten_thousand_deep_chain_stops_at_max_depth(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [vol("deep")] + [snap(vol("deep"), str(i)) for i in range(1, 10000)]
    for i, name in enumerate(names):  # names[0] is the bottom
        write_qcow2(root / name, backing=names[i - 1] if i else None)
    opened: list[str] = []
    real = inspect_mod._inspect_one

    def counting(path: str, *rest: object):  # type: ignore[no-untyped-def]
        opened.append(path)
        return real(path, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(inspect_mod, "_inspect_one", counting)
    err = _rule(root / names[-1], root)
    assert err.rule == "depth"
    assert len(opened) == 128
    assert err.path == str(root / names[-129])
    chain = inspect_chain(root / names[99], roots=[root], max_depth=100)
    assert len(chain.layers) == 100


def test_huge_l1_rejected(root: Path) -> None:
    write_qcow2(root / A, l1_size=1 << 28)
    assert _rule(root / A, root).rule == "l1-table"
    write_qcow2(root / A, l1_size=1 << 28, size=1 << 50, cluster_bits=9)
    assert _rule(root / A, root).rule == "l1-table"


def test_l1_smaller_than_virtual_size_needs_rejected(root: Path) -> None:
    write_qcow2(root / A, size=1 << 30, l1_size=1)
    assert _rule(root / A, root).rule == "l1-table"


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"l1_offset": 1 << 40}, "l1-table"),
        ({"refcount_offset": 1 << 40}, "refcount-table"),
        ({"nb_snapshots": 3, "snapshots_offset": 1 << 40}, "snapshot-table"),
        ({"nb_snapshots": 1 << 20, "snapshots_offset": 512}, "snapshot-table"),
        ({"l1_entries": [1 << 40]}, "l1-table"),
        ({"l1_entries": [0x1234]}, "l1-table"),
        ({"incompatible": 1 << 20}, "unknown-features"),
        ({"incompatible": 1 << 1}, "corrupt-flag"),
        ({"crypt_method": 1}, "encryption"),
        ({"version": 4}, "version"),
        ({"size": 1 << 62, "l1_size": 1}, "virtual-size"),
    ],
)
def test_bad_header_fields_rejected(root: Path, kw: dict[str, object], rule: str) -> None:
    write_qcow2(root / A, **kw)  # type: ignore[arg-type]
    err = _rule(root / A, root)
    assert err.rule == rule, err


@pytest.mark.parametrize("bits", [8, 22, 30, 1 << 31])
def test_cluster_bits_out_of_range_rejected(root: Path, bits: int) -> None:
    write_qcow2(root / A)
    with open(root / A, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", bits))
    assert _rule(root / A, root).rule == "cluster-size"


def test_qcow2_expected_but_content_is_raw(root: Path) -> None:
    (root / A).write_bytes(b"\0" * 65536)
    assert _rule(root / A, root).rule == "format"
    assert _rule(root / A, root, fmt="vmdk").rule == "format"


def test_raw_volume_holding_a_qcow2_header_is_read_as_raw(root: Path) -> None:
    """Content must never choose the format: a raw file stays raw, its backing unfollowed."""
    write_qcow2(root / A, backing="/etc/shadow", backing_fmt="raw")
    data = (root / A).read_bytes()
    with open_chain(root / A, roots=[root], fmt="raw") as chain:
        assert len(chain.layers) == 1 and chain.layers[0].fmt == "raw"
        assert chain.read(0, len(data)) == data


def test_raw_backing_is_never_probed(root: Path) -> None:
    """A backing recorded as raw whose bytes look like a qcow2 with its own backing."""
    write_qcow2(root / B, backing="/etc/shadow", backing_fmt="raw")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", B, "-F", "raw", A, "1M"], cwd=root)
    with open_chain(root / A, roots=[root]) as chain:
        assert [i.fmt for i in chain.layers] == ["qcow2", "raw"]
        assert chain.read(0, 4) == b"QFI\xfb"


def test_extended_l2_accepted_but_other_new_bits_not(root: Path) -> None:
    """oslo.utils does not know the ext-L2 bit; we overrule only that, nothing else."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", A, "1M"], cwd=root)
    assert inspect_chain(root / A, roots=[root]).layers[0].cluster_size == 65536
    data = bytearray((root / A).read_bytes())
    data[79] |= 1 << 5
    (root / B).write_bytes(bytes(data))
    assert _rule(root / B, root).rule == "unknown-features"


def test_v2_overlay_not_mistaken_for_data_file(root: Path) -> None:
    """oslo reads a v2 header's first extension as feature bits; the overlay is fine."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", B, "1M"], cwd=root)
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            B,
            "-F",
            "qcow2",
            A,
            "1M",
        ],
        cwd=root,
    )
    chain = inspect_chain(root / A, roots=[root])
    assert chain.layers[0].version == 2 and chain.layers[0].backing_name == B


def test_qemu_img_check_agrees_struct_images_are_valid(root: Path) -> None:
    """The struct writer makes images QEMU itself accepts, so rejections are ours, not junk."""
    write_qcow2(root / A)
    res = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(root / A)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert inspect_chain(root / A, roots=[root]).virtual_size == 1 << 20
