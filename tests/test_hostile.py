"""Hostile and careless input end to end (issue 10): bad UIDs, control characters in names,
symlinks and hard links in the inbox, and a fuzz run of mutated headers against a real daemon.

Each test drops real files into a real daemon's inbox (or runs ``forwarder send``) against a
real SCP on loopback, and asserts what the peer received and where every file ended.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import SCP, free_port
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from test_daemon import Corpus, Forwarder, dest, has_all, once, received

# the daemon fixtures, re-exported for pytest
from test_daemon import corpus as corpus
from test_daemon import fwd as fwd

from forwarder.cli import main as cli_main
from forwarder.commands.send import main as send_main
from forwarder.dicomfile import DicomInfo, InvalidDicom, inspect
from forwarder.outbox import Outbox, State

EXPLICIT_LE = b"1.2.840.10008.1.2.1\x00"


def bad_ts(corpus: Corpus) -> bytes:
    """An instance whose Transfer Syntax UID has a non-ASCII byte (issue 10 item 2)."""
    _, data = corpus.encode()
    assert data.count(EXPLICIT_LE) == 1
    return data.replace(EXPLICIT_LE, b"1.2.840.10008.\xe9.2.1\x00")


def bad_instance(corpus: Corpus) -> bytes:
    """An instance whose SOP Instance UID (meta and data set) has a non-ASCII byte (item 3)."""
    uid, data = corpus.encode()
    bad = uid[:-3].encode() + b"\xe9" + uid[-2:].encode()
    return data.replace(uid.encode(), bad)


def assert_no_crash(text: str) -> None:
    assert "Traceback" not in text and "crashed" not in text, text[-3000:]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`forwarder send` sets up logging for the process; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# -- items 2 and 3: a UID that cannot be sent makes the file invalid ------------------------


def test_bad_uids_are_quarantined_and_never_block_the_good_files(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)]).start()
    (fwd.inbox / "bad-ts.dcm").write_bytes(bad_ts(corpus))
    (fwd.inbox / "bad-uid.dcm").write_bytes(bad_instance(corpus))
    good = corpus.many(fwd.inbox, 5)
    fwd.wait(has_all(scp, good), timeout=20, what="the good files")
    fwd.wait(lambda: len(fwd.quarantined()) == 2, timeout=15, what="2 quarantined files")
    later = corpus.many(fwd.inbox, 3, prefix="later")
    fwd.wait(has_all(scp, later), timeout=15, what="files dropped after the bad ones")
    assert fwd.stop() == 0
    assert received(scp) == once([*good, *later])
    reasons = {
        name: json.loads((fwd.quarantine / f"{name}.json").read_text())["reason"]
        for name in ("bad-ts.dcm", "bad-uid.dcm")
    }
    assert "Transfer Syntax UID (0002,0010) '1.2.840.10008.\\xe9.2.1'" in reasons["bad-ts.dcm"]
    assert "SOP Instance UID" in reasons["bad-uid.dcm"] and "\\xe9" in reasons["bad-uid.dcm"]
    assert not fwd.inbox_files()
    assert_no_crash(fwd.text())


def test_rows_queued_with_bad_uids_before_the_upgrade_never_reach_the_peer(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    # queued by a version that did not check UIDs (the stuck outbox): after the
    # upgrade the rows are quarantined and the good files behind them are sent
    bad = {
        "ts.dcm": ("1.2.840.10008.\ufffd.2.1", None),
        "uid.dcm": (None, "1.2.826.0.1.3680043.10.999.\ufffd"),
    }
    fwd.outbox_path.parent.mkdir(parents=True)
    with Outbox(fwd.outbox_path) as ob:
        for name, (ts, uid) in bad.items():
            path = fwd.inbox / name
            corpus.write(path)
            info = inspect(path)
            rec = DicomInfo(
                path=path,
                size=info.size,
                mtime_ns=info.mtime_ns,
                sop_class_uid=info.sop_class_uid,
                sop_instance_uid=uid or info.sop_instance_uid,
                transfer_syntax=ts or info.transfer_syntax,
                study_uid=info.study_uid,
                dataset_offset=info.dataset_offset,
            )
            ob.enqueue_many([rec], ["pacs"], time.time())
    good = corpus.many(fwd.inbox, 3)
    fwd.configure([dest("pacs", scp.port)]).start()
    fwd.wait(has_all(scp, good), timeout=20, what="the good files")
    fwd.wait(lambda: len(fwd.quarantined()) == 2, what="the two bad rows' files quarantined")
    assert fwd.stop() == 0
    assert received(scp) == once(good)
    rows = {Path(d.path).name: d for d in fwd.deliveries()}
    assert rows["ts.dcm"].state is State.QUARANTINED
    assert "invalid Transfer Syntax UID '1.2.840.10008.\\xef\\xbf\\xbd.2.1'" in str(
        rows["ts.dcm"].last_error
    )
    assert "invalid SOP Instance UID" in str(rows["uid.dcm"].last_error)
    assert_no_crash(fwd.text())


def test_send_skips_a_file_with_a_bad_uid_and_sends_the_rest(
    scp: SCP,
    tmp_path: Path,
    corpus: Corpus,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-bad-ts.dcm").write_bytes(bad_ts(corpus))
    (folder / "b-bad-uid.dcm").write_bytes(bad_instance(corpus))
    good = corpus.write(folder / "c-good.dcm")
    rc = send_main(["127.0.0.1", str(scp.port), str(folder)])
    err = capsys.readouterr().err
    assert rc != 0
    assert scp.uids() == [good]
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert any("a-bad-ts.dcm" in s and "Transfer Syntax UID" in s for s in skipped), err
    assert any("b-bad-uid.dcm" in s and "SOP Instance UID" in s for s in skipped), err
    assert "Traceback" not in err


# -- item 12: control characters in names and UIDs never reach the log raw ------------------


def test_newlines_and_nul_in_names_and_uids_cannot_forge_log_lines(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", scp.port)], log={"level": "debug"}).start()
    forged = "2026-01-01T00:00:00.000+00:00 I: sent: forged.dcm (1.2.3) -> pacs: Success"
    (fwd.inbox / f"x\n{forged}").write_text("not DICOM\n")
    uid, data = corpus.encode()
    nul_uid = uid[:-2].encode() + b"\x00\n"  # NULs inside a UID were seen; padding is stripped
    (fwd.inbox / f"y\r\x1b[2K{forged}.dcm").write_bytes(data.replace(uid.encode(), nul_uid))
    fwd.wait(lambda: len(fwd.quarantined()) == 2, timeout=15, what="2 quarantined files")
    good = corpus.many(fwd.inbox, 2)
    fwd.wait(has_all(scp, good), timeout=15, what="good files")
    assert fwd.stop() == 0
    lines = fwd.text().splitlines()
    assert not [line for line in lines if "forged.dcm" in line and line.startswith("2026-01-01")]
    assert any("x\\n2026-01-01T00:00:00.000+00:00 I: sent: forged.dcm" in li for li in lines)
    assert any("y\\r\\x1b[2K2026" in li for li in lines), fwd.tail()
    raw = fwd.log.read_bytes()
    assert b"\x00" not in raw and b"\x1b" not in raw and b"\r" not in raw
    assert_no_crash(fwd.text())


def test_send_escapes_control_characters_in_file_names(
    scp: SCP, tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a\nE: forged line").write_text("not DICOM")
    assert send_main(["127.0.0.1", str(scp.port), str(folder)]) != 0
    err = capsys.readouterr().err
    assert "\nE: forged line" not in err
    assert "a\\nE: forged line" in err


# -- items 9 and 10: requeue never moves a file from or to outside its folders ---------------


def quarantine_cli(*argv: str) -> tuple[int, str, str]:
    """``forwarder quarantine ARGV`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli_main(["quarantine", *argv])
        except SystemExit as exc:
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def configured(fwd: Forwarder, corpus: Corpus) -> Forwarder:
    """A config and an outbox (no daemon running) with one quarantined file, ``q.dcm``."""
    fwd.configure([dest("pacs", 9)])
    Outbox(fwd.outbox_path).close()
    fwd.quarantine.mkdir()
    corpus.write(fwd.quarantine / "q.dcm")
    return fwd


def test_requeue_refuses_a_path_that_leads_out_of_the_quarantine(
    configured: Forwarder, corpus: Corpus
) -> None:
    fwd = configured
    victim = fwd.tmp / "victim" / "file.dcm"
    corpus.write(victim)
    before = victim.read_bytes()
    (fwd.quarantine / "link.dcm").symlink_to(victim)
    (fwd.quarantine / "dirlink").symlink_to(victim.parent, target_is_directory=True)
    for given in (
        "../victim/file.dcm",
        str(fwd.quarantine / ".." / "victim" / "file.dcm"),
        "link.dcm",
        "dirlink/file.dcm",
    ):
        status, out, err = quarantine_cli("requeue", given, "--config", str(fwd.cfg))
        assert status != 0, (given, out)
        assert "not under quarantine.dir" in err and len(err.strip().splitlines()) == 1, err
        assert victim.read_bytes() == before
        assert not fwd.inbox_files()
    # --all does not take a symlink for a quarantined file either
    status, out, err = quarantine_cli("requeue", "--all", "--config", str(fwd.cfg))
    assert status == 0, err
    assert [p.name for p in fwd.inbox_files()] == ["q.dcm"]
    assert victim.read_bytes() == before and (fwd.quarantine / "link.dcm").is_symlink()


@pytest.mark.parametrize(
    "original",
    [
        "{inbox}/../victim/file.dcm",  # lexically under the inbox, really outside
        "{inbox}/sub/../../victim/file.dcm",
        "{inbox}/escape/file.dcm",  # a symlinked folder in the inbox leading out
        "../victim/file.dcm",  # not absolute
    ],
)
def test_requeue_refuses_a_forged_sidecar_original_path(
    configured: Forwarder, original: str
) -> None:
    fwd = configured
    outside = fwd.tmp / "victim"
    outside.mkdir()
    (fwd.inbox / "escape").symlink_to(outside, target_is_directory=True)
    sidecar = {"reason": "test", "original_path": original.format(inbox=fwd.inbox)}
    (fwd.quarantine / "q.dcm.json").write_text(json.dumps(sidecar))
    status, out, err = quarantine_cli("requeue", "q.dcm", "--config", str(fwd.cfg))
    assert status != 0, out
    assert "cannot requeue" in err and len(err.strip().splitlines()) == 1, err
    assert not list(outside.iterdir())
    assert (fwd.quarantine / "q.dcm").is_file()


def test_requeue_goes_back_to_the_inbox_relative_path(configured: Forwarder) -> None:
    fwd = configured
    sidecar = {"reason": "test", "original_path": str(fwd.inbox / "a" / "b.dcm")}
    (fwd.quarantine / "q.dcm.json").write_text(json.dumps(sidecar))
    status, _out, err = quarantine_cli("requeue", "q.dcm", "--config", str(fwd.cfg))
    assert status == 0, err
    assert fwd.inbox_files() == [fwd.inbox / "a" / "b.dcm"]
    # a sidecar naming a folder that is no longer watched: back at its quarantine path
    (fwd.quarantine / "c").mkdir()
    Path(fwd.inbox / "a" / "b.dcm").rename(fwd.quarantine / "c" / "d.dcm")
    sidecar = {"reason": "test", "original_path": str(fwd.tmp / "old-inbox" / "x.dcm")}
    (fwd.quarantine / "c" / "d.dcm.json").write_text(json.dumps(sidecar))
    status, _out, err = quarantine_cli("requeue", "c/d.dcm", "--config", str(fwd.cfg))
    assert status == 0, err
    assert fwd.inbox_files() == [fwd.inbox / "c" / "d.dcm"]


# -- item 11: symlinks in the inbox ----------------------------------------------------------


def test_symlinks_are_skipped_with_one_warning_and_never_read_or_moved(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    outside = fwd.tmp / "outside"
    secret_uid = corpus.write(outside / "secret.dcm")
    fwd.configure(
        [dest("pacs", scp.port)], watch={"rescan_seconds": 0.5}, log={"level": "debug"}
    ).start()
    links = {
        fwd.inbox / "passwd.dcm": Path("/etc/passwd"),
        fwd.inbox / "secret.dcm": outside / "secret.dcm",
        fwd.inbox / "folder": outside,
        fwd.inbox / "dangling.dcm": outside / "nothing-here",
    }
    for link, target in links.items():
        link.symlink_to(target)
    good = corpus.many(fwd.inbox, 3)
    fwd.wait(has_all(scp, good), timeout=15, what="the good files")
    for link in links:
        fwd.wait_log(f"skipped symlink {link} -> ", timeout=10)
    scans = fwd.text().count("scanned ")
    fwd.wait(lambda: fwd.text().count("scanned ") >= scans + 2, what="two more rescans")
    assert fwd.stop() == 0
    assert received(scp) == once(good)
    assert secret_uid not in scp.uids()
    assert fwd.quarantined() == []
    assert all(link.is_symlink() for link in links)
    assert (outside / "secret.dcm").is_file()
    text = fwd.text()
    for link in links:
        assert text.count(f"skipped symlink {link} -> ") == 1, text
    assert_no_crash(text)


def test_follow_symlinks_follows_links_inside_the_watched_folders_only(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    outside = fwd.tmp / "outside"
    secret_uid = corpus.write(outside / "secret.dcm")
    fwd.configure([dest("pacs", scp.port)], watch={"follow_symlinks": True}).start()
    hidden_uid = corpus.write(fwd.inbox / ".store" / "hidden.dcm")  # ignored folder (".*")
    (fwd.inbox / "hidden-link.dcm").symlink_to(fwd.inbox / ".store" / "hidden.dcm")
    (fwd.inbox / "secret.dcm").symlink_to(outside / "secret.dcm")
    plain_uid = corpus.write(fwd.tmp / "plain.dcm")
    (fwd.tmp / "plain.dcm").rename(fwd.inbox / "plain.dcm")
    (fwd.inbox / "plain-link.dcm").symlink_to(fwd.inbox / "plain.dcm")
    fwd.wait(has_all(scp, [hidden_uid, plain_uid]), timeout=15, what="the linked files")
    fwd.wait_log(f"skipped symlink {fwd.inbox / 'secret.dcm'} -> ", timeout=10)
    fwd.wait(
        lambda: {p.name for p in fwd.inbox_files()} == {"hidden.dcm", "secret.dcm"},
        what="the inbox emptied but for the ignored file and the link to outside",
    )
    assert fwd.stop() == 0
    assert received(scp) == once([hidden_uid, plain_uid])  # a link and its target: once
    assert secret_uid not in scp.uids()
    assert (fwd.inbox / "secret.dcm").is_symlink() and fwd.quarantined() == []
    assert_no_crash(fwd.text())


# -- item 14: two names of one file are one instance -----------------------------------------


@pytest.mark.parametrize("on_success", ["delete", "move"])
def test_hard_links_are_sent_once_and_every_name_leaves_the_inbox(
    fwd: Forwarder, scp: SCP, corpus: Corpus, on_success: str
) -> None:
    fwd.configure([dest("pacs", scp.port)], disposition={"on_success": on_success}).start()
    uids = []
    names = []
    for n in range(3):
        src = fwd.tmp / f"src{n}.dcm"
        uids.append(corpus.write(src))
        names += [fwd.inbox / f"a{n}.dcm", fwd.inbox / "sub" / f"b{n}.dcm"]
        (fwd.inbox / "sub").mkdir(exist_ok=True)
        os.link(src, names[-2])
        os.link(src, names[-1])
    fwd.wait(has_all(scp, uids), timeout=15, what="the linked instances")
    fwd.wait(lambda: not fwd.inbox_files(), what="every name out of the inbox")
    assert fwd.stop() == 0
    assert received(scp) == once(uids)
    assert fwd.text().count("another name (hard link)") == 3
    if on_success == "move":
        archived = sorted(p.relative_to(fwd.archive) for p in fwd.archive.rglob("*.dcm"))
        assert archived == sorted(p.relative_to(fwd.inbox) for p in names)
    assert_no_crash(fwd.text())


# -- fuzz: mutated headers never stop the pipeline -------------------------------------------

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261210"))  # fixed; set FUZZ_SEED to explore
FUZZ_FILES = 240
ODD_NAMES = [
    "new\nline",
    "carriage\rreturn",
    "tab\there",
    "esc\x1b[31mred",
    "  spaced  name  ",
    "ünïcödé-名前",
    "-leading-dash",
    "back\\slash",
    "bidi\u202egpj.exe",
    "x" * 200,
    "no-extension",
]
BAD_UID_BYTES = [b"\xe9", b"\xff", b"\x00", b"\n", b"a", b".", b" ", b"\x1b", b"5", b"0"]


_LONG_VRS = (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL")


def _elements(data: bytes, start: int, *, explicit: bool = True) -> list[tuple[int, int]]:
    """(offset of the length field, its width) of each top-level little-endian element."""
    found = []
    pos = start
    while pos + 8 <= len(data):
        if data[pos : pos + 2] != b"\x02\x00" and start > 0 and pos < 132 + 8:
            break
        if not explicit:
            at, width = pos + 4, 4
        elif data[pos + 4 : pos + 6] in _LONG_VRS:
            at, width = pos + 8, 4
        else:
            at, width = pos + 6, 2
        found.append((at, width))
        pos = at + width + int.from_bytes(data[at : at + width], "little")
    return found


def _replace_some(value: bytes, rng: random.Random) -> bytes:
    """`value` with 1-3 of its characters replaced by bytes a UID must not (or may) have."""
    out = bytearray(value)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] = rng.choice(BAD_UID_BYTES)[0]
    return bytes(out)


def encode_as(data: bytes, encoding: str) -> bytes:
    """An explicit VR little endian Part 10 file re-encoded: implicit VR, deflated, or a bare
    data set with no preamble and no file meta."""
    if encoding == "explicit":
        return data
    ds = dcmread(io.BytesIO(data))
    buf = io.BytesIO()
    if encoding == "nometa":
        ds.preamble = None
        del ds.file_meta
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    else:
        ts = {"implicit": ImplicitVRLittleEndian, "deflated": DeflatedExplicitVRLittleEndian}
        ds.file_meta.TransferSyntaxUID = ts[encoding]
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mutate(uid: str, data: bytes, encoding: str, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of an encoded instance: (kind, bytes)."""
    has_meta = data[128:132] == b"DICM"
    meta_end = 144 + int.from_bytes(data[140:144], "little") if has_meta else 0
    pixels = data.rfind(b"\xe0\x7f\x10\x00")  # the pixel data element (not in a deflated set)
    header_end = pixels if pixels > meta_end else len(data)
    kinds = ["flip", "truncate", "length", "uid", "class", "name"]
    kind = rng.choice([*kinds, "ts"] if has_meta else kinds)
    out = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(124 if has_meta else 0, header_end)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        out = out[: rng.randrange(0, len(out))]
    elif kind == "length":
        places = _elements(data, 132) if has_meta else []
        if encoding != "deflated":
            places += _elements(data, meta_end, explicit=encoding != "implicit")
        at, width = rng.choice(places)
        limit = 1 << (8 * width)
        value = rng.choice([len(data) - at + rng.randint(1, 9999), limit - 1, limit - 2])
        out[at : at + width] = (value % limit).to_bytes(width, "little")
    elif kind == "uid":
        which = rng.choice([data.index(uid.encode()), data.rindex(uid.encode())])
        out[which : which + len(uid)] = _replace_some(uid.encode(), rng)
    elif kind == "ts":
        at = data.index(b"\x02\x00\x10\x00UI") + 8
        size = int.from_bytes(data[at - 2 : at], "little")
        value = data[at : at + size].rstrip(b"\x00")
        out[at : at + len(value)] = _replace_some(value, rng)
    elif kind == "class":
        sc = b"1.2.840.10008.5.1.4.1.1.7"
        at = rng.choice([data.index(sc), data.rindex(sc)])
        out[at : at + len(sc)] = _replace_some(sc, rng)
    return kind, bytes(out)


def _dataset_bytes(path: Path) -> bytes | str:
    """What the peer must receive for this file (its data set), or why it is invalid."""
    try:
        info = inspect(path)
    except InvalidDicom as exc:
        return exc.reason
    data = path.read_bytes()[info.dataset_offset :]
    return data + b"\x00" if len(data) % 2 else data


def test_fuzzed_headers_are_sent_complete_or_quarantined_with_a_reason(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    rng = random.Random(FUZZ_SEED)
    staged = fwd.tmp / "staged"
    staged.mkdir()
    expected: dict[str, bytes | str] = {}  # name in the inbox -> data set, or reason
    kinds: Counter[str] = Counter()
    encodings: Counter[str] = Counter()
    for i in range(FUZZ_FILES):
        uid, data = corpus.encode()
        encoding = rng.choice(["explicit", "explicit", "implicit", "deflated", "nometa"])
        kind, mutated = mutate(uid, encode_as(data, encoding), encoding, rng)
        kinds[kind] += 1
        encodings[encoding] += 1
        name = f"m{i:03d}-{encoding}-{kind}.dcm"
        if kind == "name" or rng.random() < 0.2:
            name = f"m{i:03d}-{rng.choice(ODD_NAMES)}"
        (staged / name).write_bytes(mutated)
        expected[name] = _dataset_bytes(staged / name)
    invalid = {n for n, e in expected.items() if isinstance(e, str)}
    assert 30 <= len(invalid) <= FUZZ_FILES - 30, kinds  # both outcomes are well exercised
    fwd.configure([dest("pacs", scp.port)], retry={"max_attempts": 2}).start()
    t0 = time.monotonic()
    for name in expected:
        (staged / name).rename(fwd.inbox / name)
    fwd.wait(lambda: not fwd.inbox_files(), timeout=45, what="every fuzzed file handled")
    control = corpus.many(fwd.inbox, 1, prefix="control")
    fwd.wait(has_all(scp, control), timeout=15, what="the control file after the fuzz")
    elapsed = time.monotonic() - t0
    assert fwd.alive()
    assert fwd.stop() == 0
    by_data = {e: n for n, e in expected.items() if isinstance(e, bytes)}
    delivered: Counter[str] = Counter()
    with scp.lock:
        got = [r for r in scp.received if r.sop_instance_uid not in control]
    for r in got:
        assert r.encoded in by_data, f"{r.sop_instance_uid}: not the data set of any file"
        delivered[by_data[r.encoded]] += 1
    assert all(count == 1 for count in delivered.values()), delivered.most_common(3)
    for name, want in expected.items():
        sidecar = fwd.quarantine / f"{name}.json"
        if name in delivered:
            assert not sidecar.exists(), name
            continue
        assert (fwd.quarantine / name).is_file(), f"{name!r}: neither sent nor quarantined"
        reason = json.loads(sidecar.read_text())["reason"]
        assert reason, name
        if isinstance(want, str):
            assert reason == want, (name, reason, want)
        else:
            print(f"quarantined although valid: {name!r}: {reason}")
    text = fwd.text()
    assert_no_crash(text)
    # bad input is the file's problem, never the association's: the peer was never paused
    assert "paused" not in text, [line for line in text.splitlines() if "paused" in line][:3]
    print(
        f"\nfuzz: {FUZZ_FILES} files ({dict(kinds)}, {dict(encodings)}), "
        f"{len(delivered)} delivered, "
        f"{FUZZ_FILES - len(delivered)} quarantined ({len(invalid)} invalid), {elapsed:.1f} s"
    )


def test_quarantine_list_and_show_escape_control_characters(configured: Forwarder) -> None:
    fwd = configured
    name = "evil\x1b[2J\nforged.dcm"
    (fwd.quarantine / "q.dcm").rename(fwd.quarantine / name)
    sidecar = {"reason": "bad\rreason", "original_path": str(fwd.inbox / name)}
    (fwd.quarantine / f"{name}.json").write_text(json.dumps(sidecar))
    status, out, err = quarantine_cli("list", "--config", str(fwd.cfg))
    assert status == 0, err
    assert "evil\\x1b[2J\\nforged.dcm" in out and "\x1b" not in out and "\r" not in out
    status, out, err = quarantine_cli("show", name, "--config", str(fwd.cfg))
    assert status == 0, err
    assert "\x1b" not in out and "\r" not in out and "bad\\rreason" in out


def test_a_hard_link_made_while_the_first_name_waits_across_a_restart_is_sent_once(
    fwd: Forwarder, scp: SCP, corpus: Corpus
) -> None:
    fwd.configure([dest("pacs", free_port())]).start()  # nobody listens: it stays queued
    uid = corpus.write(fwd.inbox / "a.dcm")
    fwd.wait(lambda: len(fwd.deliveries()) == 1, what="a.dcm queued")
    assert fwd.stop() == 0
    (fwd.inbox / "sub").mkdir()
    os.link(fwd.inbox / "a.dcm", fwd.inbox / "sub" / "b.dcm")
    fwd.configure([dest("pacs", scp.port)]).start()
    fwd.wait(has_all(scp, [uid]), timeout=30, what="the instance")
    fwd.wait(lambda: not fwd.inbox_files(), what="both names out of the inbox")
    assert fwd.stop() == 0
    assert received(scp) == once([uid])
    assert "another name (hard link)" in fwd.text()


def test_a_hard_link_whose_first_name_vanishes_before_sending_is_sent_itself(
    fwd: Forwarder, make_scp: Callable[..., SCP], corpus: Corpus
) -> None:
    port = free_port()
    fwd.configure([dest("pacs", port)]).start()  # the peer is down for now
    uid = corpus.write(fwd.tmp / "src.dcm")
    os.link(fwd.tmp / "src.dcm", fwd.inbox / "a.dcm")
    os.link(fwd.tmp / "src.dcm", fwd.inbox / "b.dcm")
    fwd.wait_log("another name (hard link)")
    (row,) = fwd.wait(fwd.deliveries, what="the first name queued")
    first = Path(row.path)
    first.unlink()  # the name it was queued under vanishes before it could be sent
    scp = make_scp(port=port)
    fwd.wait(has_all(scp, [uid]), timeout=30, what="the instance, sent under its other name")
    fwd.wait(lambda: not fwd.inbox_files(), what="an empty inbox")
    assert fwd.stop() == 0
    assert received(scp) == once([uid])
