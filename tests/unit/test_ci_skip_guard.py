"""Under CI=true a skipped functional test must fail the run; elsewhere it is just a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, ci: str | None, body: str) -> subprocess.CompletedProcess[str]:
    d = tmp_path / "functional"
    d.mkdir()
    (d / "test_x.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(d),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


SKIPS = "import pytest\n\ndef test_a():\n    pytest.skip('peer missing')\n"
PASSES = "def test_a():\n    assert True\n"


@pytest.mark.parametrize(
    ("ci", "body", "rc"),
    [
        ("true", SKIPS, 1),
        (None, SKIPS, 0),
        ("true", PASSES, 0),
    ],
)
def test_skipped_functional_fails_only_under_ci(
    tmp_path: Path, ci: str | None, body: str, rc: int
) -> None:
    out = _run(tmp_path, ci, body)
    assert out.returncode == rc, out.stdout + out.stderr
    if rc:
        assert "functional test(s) skipped under CI" in out.stdout
