"""The Cinder ledger: byte compatibility with Cinder, validation, crash-safe writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from qcow2._ledger import Ledger, dump_ledger, read_ledger, write_ledger
from qcow2.errors import LedgerError

VOL = "0b1c2d3e-4f50-4a6b-8c7d-8e9fa0b1c2d3"
SNAP_A = "aaaaaaaa-1111-4222-8333-444444444444"
SNAP_B = "bbbbbbbb-1111-4222-8333-444444444444"
BASE = f"volume-{VOL}"


def cinder_write_info_file(info_path: Path, snap_info: dict[str, str]) -> None:
    """Cinder's own write, reproduced as the reference.

    cinder/volume/drivers/remotefs.py, RemoteFSSnapDriverBase._write_info_file:
        with open(info_path, 'w') as f:
            json.dump(snap_info, f, indent=1, sort_keys=True)
    """
    with open(info_path, "w") as f:
        json.dump(snap_info, f, indent=1, sort_keys=True)


def sample() -> Ledger:
    return Ledger(
        active=f"{BASE}.{SNAP_B}",
        snapshots={SNAP_B: f"{BASE}.{SNAP_B}", SNAP_A: f"{BASE}.{SNAP_A}"},
    )


def test_round_trip(tmp_path: Path) -> None:
    write_ledger(str(tmp_path), VOL, sample())
    assert read_ledger(str(tmp_path), VOL) == sample()
    write_ledger(str(tmp_path), VOL, Ledger(active=BASE))
    assert read_ledger(str(tmp_path), VOL) == Ledger(active=BASE, snapshots={})


def test_bytes_identical_to_cinders_write(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    cinder_write_info_file(ref, sample().to_json_dict())
    write_ledger(str(tmp_path), VOL, sample())
    ours = (tmp_path / f"{BASE}.info").read_bytes()
    assert ours == ref.read_bytes()
    assert dump_ledger(sample()) == ref.read_bytes()
    assert not ours.endswith(b"\n")  # Cinder writes no trailing newline


def test_reads_file_cinder_wrote(tmp_path: Path) -> None:
    cinder_write_info_file(tmp_path / f"{BASE}.info", sample().to_json_dict())
    assert read_ledger(str(tmp_path), VOL) == sample()


def test_missing_is_none(tmp_path: Path) -> None:
    assert read_ledger(str(tmp_path), VOL) is None


def test_empty_file_names_the_file_or_is_missing_by_option(tmp_path: Path) -> None:
    path = tmp_path / f"{BASE}.info"
    path.write_bytes(b"")
    with pytest.raises(LedgerError, match=str(path)) as err:
        read_ledger(str(tmp_path), VOL)
    assert "empty" in str(err.value)
    assert read_ledger(str(tmp_path), VOL, empty_as_missing=True) is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({SNAP_A: f"{BASE}.{SNAP_A}"}),  # no active
        json.dumps({"active": "../etc/passwd"}),
        json.dumps({"active": f"/srv/x/{BASE}"}),
        json.dumps({"active": f"{BASE}", SNAP_A: f"sub/{BASE}.{SNAP_A}"}),
        json.dumps({"active": "volume-11111111-1111-4111-8111-111111111111"}),  # other volume
        json.dumps({"active": BASE, "not-a-uuid": BASE}),
        json.dumps({"active": BASE, SNAP_A: 5}),
        json.dumps({"active": f"{BASE}.info"}),
    ],
)
def test_garbage_and_unsafe_names_rejected_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / f"{BASE}.info"
    path.write_text(content)
    with pytest.raises(LedgerError, match=str(path)):
        read_ledger(str(tmp_path), VOL)


def test_symlinked_ledger_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    cinder_write_info_file(target, sample().to_json_dict())
    (tmp_path / f"{BASE}.info").symlink_to(target)
    with pytest.raises(LedgerError):
        read_ledger(str(tmp_path), VOL)


def test_write_refuses_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        write_ledger(str(tmp_path), VOL, Ledger(active="../x"))
    assert os.listdir(tmp_path) == []


def test_crash_during_replace_keeps_old_ledger_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ledger(str(tmp_path), VOL, sample())
    before = (tmp_path / f"{BASE}.info").read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash in rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_ledger(str(tmp_path), VOL, Ledger(active=BASE))
    assert (tmp_path / f"{BASE}.info").read_bytes() == before
    assert os.listdir(tmp_path) == [f"{BASE}.info"]


def test_keeps_mode_of_existing_file_and_sets_mode_on_new(tmp_path: Path) -> None:
    write_ledger(str(tmp_path), VOL, sample(), mode=0o640)
    path = tmp_path / f"{BASE}.info"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)
    write_ledger(str(tmp_path), VOL, Ledger(active=BASE))
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_keeps_owner_of_existing_file(tmp_path: Path) -> None:
    write_ledger(str(tmp_path), VOL, sample())
    path = tmp_path / f"{BASE}.info"
    os.chown(path, 64055, 64055)
    write_ledger(str(tmp_path), VOL, Ledger(active=BASE))
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (64055, 64055)
