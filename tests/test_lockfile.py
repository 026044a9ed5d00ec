"""Tests for forwarder.lockfile: real lock files, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forwarder.lockfile import LockedError, LockError, hold


def test_a_second_hold_fails_naming_the_holder_until_released(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = hold(path)
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(LockedError) as err:
        hold(path)  # flock belongs to the open file: the same process is refused too
    assert err.value.pid == os.getpid()
    assert f"held by pid {os.getpid()}" in str(err.value)
    first.release()
    first.release()  # idempotent
    with hold(path):
        pass
    assert path.exists()  # left in place on purpose


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = (
        "import sys, time; from pathlib import Path; from forwarder.lockfile import hold\n"
        "h = hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        with pytest.raises(LockedError) as err:
            hold(path)
        assert err.value.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    with hold(path):  # kill -9 leaves no stale lock
        pass


def test_a_lock_file_that_cannot_be_created_is_a_lock_error(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="cannot open the lock file") as err:
        hold(tmp_path / "missing" / "x.lock")
    assert not isinstance(err.value, LockedError)


def test_a_holder_that_wrote_no_pid_is_another_process(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with hold(path):
        path.write_text("")
        with pytest.raises(LockedError, match="held by another process") as err:
            hold(path)
        assert err.value.pid is None
