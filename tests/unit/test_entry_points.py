"""The three console scripts are installed and answer --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("cmd", ["qsnap", "qsnap-agent", "qsnap-api"])
def test_console_script_help(cmd: str) -> None:
    exe = BIN / cmd
    assert exe.exists() or shutil.which(cmd), f"{cmd} not installed"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"usage: {cmd}" in out.stdout
