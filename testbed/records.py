"""Parse the record log that tools/guest/qsnap-writer.c appends inside the guest.

Why: a point-in-time image is only correct if it holds a clean prefix of what the guest
wrote, and a freeze is only visible as a gap between record timestamps. Both are checked
here on the bytes, never on host wall time.

Record layout (64 bytes, little endian): magic ``QSNAPREC``, u64 seq, u64 CLOCK_REALTIME
ns, u32 pid, u32 interval_ms, 28 filler bytes, u32 CRC-32 of bytes 0..59.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass, field

RECORD_SIZE = 64
MAGIC = b"QSNAPREC"
_CRC_OFF = 60
_HEAD = struct.Struct("<8sQQII")


@dataclass(frozen=True)
class RecordLog:
    """The valid records of one file plus why the file is not a clean log, if it is not."""

    seqs: tuple[int, ...]
    times_ns: tuple[int, ...]
    clean: bool
    problems: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.seqs)

    @property
    def last_time_ns(self) -> int | None:
        return self.times_ns[-1] if self.times_ns else None

    def _window(self, t_from: int | None, t_to: int | None) -> list[int]:
        # Linear, not bisect: the guest clock may be stepped (guest-set-time).
        lo = -(2**63) if t_from is None else t_from
        hi = 2**63 if t_to is None else t_to
        return [t for t in self.times_ns if lo <= t <= hi]

    def max_gap_ns(self, t_from: int | None = None, t_to: int | None = None) -> int:
        """Longest time between consecutive records whose times lie in [t_from, t_to].

        The window edges count as points, so a writer that stopped inside the window shows
        a gap up to t_to rather than none.
        """
        times = self._window(t_from, t_to)
        if t_from is not None:
            times.insert(0, t_from)
        if t_to is not None:
            times.append(t_to)
        return max((b - a for a, b in itertools.pairwise(times)), default=0)

    def gaps_over(self, ns: int) -> list[tuple[int, int]]:
        """(time before, time after) of every gap between consecutive records longer than ns."""
        t = self.times_ns
        return [(a, b) for a, b in itertools.pairwise(t) if b - a > ns]

    def count_between(self, t0_ns: int, t1_ns: int) -> int:
        """Number of records stamped within [t0_ns, t1_ns]."""
        return len(self._window(t0_ns, t1_ns))

    def is_prefix_of(self, other: RecordLog) -> bool:
        """True if every record here appears, identically and in order, at the start of other."""
        n = self.count
        return (
            n <= other.count and self.seqs == other.seqs[:n] and self.times_ns == other.times_ns[:n]
        )


def _tail_problems(tail: bytes, off: int, allow_torn_tail: bool) -> list[str]:
    """Explain what follows the last valid record when it is neither nothing nor zeros."""
    if tail.count(0) == len(tail):
        return []
    if len(tail) < RECORD_SIZE and tail[:8] == MAGIC[: len(tail[:8])]:
        if allow_torn_tail:
            return []
        return [f"torn record of {len(tail)} bytes at offset {off}"]
    return [f"{len(tail)} bytes at offset {off} are neither records nor zeros"]


def parse_records(data: bytes, *, allow_torn_tail: bool = False) -> RecordLog:
    """Parse a whole record file; stop at the first invalid record and judge what follows."""
    seqs: list[int] = []
    times: list[int] = []
    problems: list[str] = []
    off = 0
    while off + RECORD_SIZE <= len(data):
        rec = data[off : off + RECORD_SIZE]
        magic, seq, t_ns, _pid, _interval = _HEAD.unpack_from(rec)
        (crc,) = struct.unpack_from("<I", rec, _CRC_OFF)
        if magic != MAGIC or crc != zlib.crc32(rec[:_CRC_OFF]):
            break
        expected = seqs[-1] + 1 if seqs else 0
        if seq != expected:
            problems.append(f"record {len(seqs)} at offset {off}: seq {seq}, expected {expected}")
        seqs.append(seq)
        times.append(t_ns)
        off += RECORD_SIZE
    problems.extend(_tail_problems(data[off:], off, allow_torn_tail))
    return RecordLog(tuple(seqs), tuple(times), not problems, problems)
