"""End-to-end tests of ``forwarder run`` against what stopped the pipeline in the attack run:
names that are not UTF-8, a full disk, a damaged outbox, a second daemon, a read-only outbox,
transient failures taken for refusals. Real daemon processes, real SCPs, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import SCP, wait_for
from test_daemon import (  # the daemon fixtures and helpers
    ROOT,
    Corpus,
    Forwarder,
    _clean_env,
    corpus,
    dest,
    fwd,
    has_all,
)

__all__ = ["corpus", "fwd"]  # fixtures, imported for pytest

EX_CANTCREAT = 73
EX_TEMPFAIL = 75


def cli(fwd: Forwarder, *argv: str) -> subprocess.CompletedProcess[str]:
    """``forwarder ARGV --config CFG`` as a subprocess; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *argv, "--config", str(fwd.cfg)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- transient failures are not refusals (item 20) ------------------------------------------


def test_transient_failures_do_not_use_up_the_refusals_and_the_sidecar_tells_them_apart(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    calls: list[int | None] = []
    answers: list[int | None] = [0xA700, None, 0xC000, 0xC000, 0xC000]
    released = threading.Event()

    def on_store(event: Any) -> int | None:
        status = answers[len(calls)] if len(calls) < len(answers) else 0xC000
        calls.append(status)
        if status is None:  # no answer within the sender's DIMSE timeout; stored anyway
            released.wait(4)
        return status

    scp.on_store = on_store
    fwd.configure([dest("pacs", scp.port, dimse_timeout=1)]).start()
    corpus.write(fwd.inbox / "odd.dcm")
    sidecar = fwd.quarantine / "odd.dcm.json"
    try:
        fwd.wait(sidecar.exists, timeout=30, what="the quarantine sidecar")
    finally:
        released.set()
    assert fwd.stop() == 0
    # the old count gave up at the third attempt (A700, timeout, C000): one refusal only
    assert len(calls) == 5
    info = json.loads(sidecar.read_text())["destinations"]["pacs"]
    assert (info["attempts"], info["refusals"], info["transient_failures"]) == (5, 3, 2)
    assert "3 refused, 2 transient" in info["meaning"]


# -- a file name that is not UTF-8 (item 1) -------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_latin1_file_name_is_delivered_and_logged_escaped(
    fwd: Forwarder, scp: SCP, corpus: Corpus, log_format: str
) -> None:
    fwd.configure(
        [dest("pacs", scp.port)],
        log={"level": "debug", "format": log_format},
        disposition={"on_success": "move"},
    ).start()
    name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1: not valid UTF-8
    odd = corpus.write(fwd.inbox / name)
    good = corpus.write(fwd.inbox / "good.dcm")
    fwd.wait(has_all(scp, [odd, good]), what="both files delivered")
    archived = fwd.archive / name
    fwd.wait(archived.exists, what="the odd file archived under its own name")
    assert os.fsencode(archived.name) == b"caf\xe9.dcm"
    # the rows point at the archived file, byte for byte
    fwd.wait(
        lambda: [d.path for d in fwd.deliveries() if d.sop_instance_uid == odd] == [str(archived)],
        what="the odd file's row pointing at its archived name",
    )
    for argv in (["find", odd], ["queue", "list", "--state", "all"], ["find", odd, "--json"]):
        shown = cli(fwd, *argv)
        assert shown.returncode == 0, shown.stderr
        assert "Traceback" not in shown.stderr
        assert "caf\\udce9.dcm" in shown.stdout or "caf\\xe9.dcm" in shown.stdout, argv
    # a restart (the old enqueuer crashed again on every start) finds nothing wrong
    assert fwd.stop() == 0
    fwd.start()
    late = corpus.write(fwd.inbox / os.fsdecode(b"late-\xff.dcm"))
    fwd.wait(has_all(scp, [late]), what="a later odd name delivered")
    assert fwd.stop() == 0
    log = fwd.log.read_bytes()
    assert b"Traceback" not in log and b"crashed" not in log
    assert b"caf\\xe9.dcm" in log or b"caf\\udce9.dcm" in log  # escaped, never raw
    assert b"caf\xe9" not in log
