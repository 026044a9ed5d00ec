"""The code stays ruff- and mypy-clean: checked as part of the suite, so CI enforces it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "forwarder", "tests", "bench"],
        ["ruff", "format", "--check", "forwarder", "tests", "bench"],
        ["mypy", "forwarder"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(cmd: list[str]) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    proc = subprocess.run(
        [str(exe), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
