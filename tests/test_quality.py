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


def test_free_port_never_hands_out_a_port_the_kernel_may_give_to_port_0() -> None:
    """Servers a test starts on port 0 (its SCPs) and outgoing connections get ports from the
    ephemeral range; a port `free_port` picked there could be taken before the daemon binds
    it (seen under load)."""
    from conftest import ephemeral_ports, free_port

    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= p < low for p in ports), (ports, low, high)
    assert len(set(ports)) == len(ports)
