"""records.py against hand-made bytes and against the real C writer's output."""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from testbed.records import RECORD_SIZE, parse_records

WRITER_SRC = Path(__file__).resolve().parents[3] / "tools" / "guest" / "qsnap-writer.c"
MS = 1_000_000


def rec(seq: int, t_ns: int) -> bytes:
    body = struct.pack("<8sQQII", b"QSNAPREC", seq, t_ns, 42, 10) + b"\xa5" * 28
    return body + struct.pack("<I", zlib.crc32(body))


def log_bytes(times_ms: list[int], first_seq: int = 0) -> bytes:
    return b"".join(rec(first_seq + i, t * MS) for i, t in enumerate(times_ms))


def test_clean_log_and_queries() -> None:
    log = parse_records(log_bytes([0, 10, 20, 300, 310]))
    assert RECORD_SIZE == 64
    assert log.clean and log.problems == []
    assert log.count == 5 and log.seqs == (0, 1, 2, 3, 4)
    assert log.last_time_ns == 310 * MS
    assert log.max_gap_ns() == 280 * MS
    assert log.max_gap_ns(0, 20 * MS) == 10 * MS
    # A window edge counts: the writer was silent from 20 ms to the window end.
    assert log.max_gap_ns(0, 200 * MS) == 180 * MS
    assert log.gaps_over(100 * MS) == [(20 * MS, 300 * MS)]
    assert log.count_between(10 * MS, 300 * MS) == 3


def test_empty_and_zero_tail_are_clean() -> None:
    assert parse_records(b"").clean and parse_records(b"").count == 0
    assert parse_records(b"").last_time_ns is None
    log = parse_records(log_bytes([0, 10]) + b"\0" * 4096)
    assert log.clean and log.count == 2


def test_torn_tail_only_when_allowed() -> None:
    data = log_bytes([0, 10, 20]) + rec(3, 30 * MS)[:40]
    strict = parse_records(data)
    assert not strict.clean and strict.count == 3
    assert "torn" in strict.problems[0]
    relaxed = parse_records(data, allow_torn_tail=True)
    assert relaxed.clean and relaxed.count == 3


def test_bad_checksum_stops_the_log() -> None:
    data = bytearray(log_bytes([0, 10, 20, 30]))
    data[2 * RECORD_SIZE + 20] ^= 0x01  # flip one timestamp bit of record 2
    log = parse_records(bytes(data), allow_torn_tail=True)
    assert not log.clean and log.count == 2
    assert "offset 128" in log.problems[0]


def test_seq_gap_and_wrong_start() -> None:
    gap = parse_records(log_bytes([0, 10]) + rec(5, 20 * MS))
    assert not gap.clean and gap.count == 3
    assert "seq 5, expected 2" in gap.problems[0]
    assert not parse_records(log_bytes([0, 10], first_seq=1)).clean


def test_garbage_after_records() -> None:
    log = parse_records(log_bytes([0, 10]) + b"\0" * 64 + b"junk", allow_torn_tail=True)
    assert not log.clean and log.count == 2
    # A partial record that does not start like one is garbage, not a torn record.
    assert not parse_records(log_bytes([0]) + b"xx", allow_torn_tail=True).clean


def test_is_prefix_of() -> None:
    full = parse_records(log_bytes([0, 10, 20, 30]))
    assert parse_records(log_bytes([0, 10])).is_prefix_of(full)
    assert parse_records(b"").is_prefix_of(full)
    assert full.is_prefix_of(full)
    assert not full.is_prefix_of(parse_records(log_bytes([0, 10])))
    assert not parse_records(log_bytes([0, 11])).is_prefix_of(full)


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc missing: run the host setup")
    exe = tmp_path_factory.mktemp("writer") / "qsnap-writer"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(WRITER_SRC)], check=True)
    return exe


def run_writer(exe: Path, out: Path, records_wanted: int) -> None:
    """Run the writer until it wrote records_wanted more records, then SIGTERM it."""
    start = out.stat().st_size if out.exists() else 0
    proc = subprocess.Popen([str(exe), str(out), "1", "3"])
    try:
        while not out.exists() or out.stat().st_size < start + records_wanted * RECORD_SIZE:
            assert proc.poll() is None, "writer died"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_real_writer_output_parses_and_resumes(writer: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    run_writer(writer, out, 20)
    first = parse_records(out.read_bytes())
    assert first.clean and first.count >= 20
    assert all(b > a for a, b in zip(first.times_ns, first.times_ns[1:], strict=False))
    # A crash can leave a torn record: the writer drops it and continues the sequence.
    with open(out, "ab") as f:
        f.write(b"QSNAPREC\x01\x02")
    run_writer(writer, out, 10)
    second = parse_records(out.read_bytes())
    assert second.clean, second.problems
    assert first.is_prefix_of(second) and second.count >= first.count + 10
