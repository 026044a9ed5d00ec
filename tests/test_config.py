"""Tests for forwarder/config.py: the schema's limits, the environment, TLS files, no file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCP, make_instance, wait_for

from forwarder.config import NO_CONFIG, ConfigError, load_settings, parse_umask
from forwarder.preflight import check_tls

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """The test's environment without FORWARDER_... variables or a systemd notify socket."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
    return {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_") and k not in drop}


def _errors(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env or {}, require_destinations=True)
    return info.value.errors


def _config(tmp_path: Path, destination: str = "", top: str = "") -> Path:
    cfg = tmp_path / "forwarder.toml"
    cfg.write_text(
        f"""{top}
[watch]
paths = ["{tmp_path / "in"}"]
[quarantine]
dir = "{tmp_path / "quarantine"}"
[outbox]
path = "{tmp_path / "state" / "outbox.sqlite3"}"
[log]
target = "stderr"

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = 104
{destination}
""",
        encoding="utf-8",
    )
    return cfg


# -- 15: timeouts, hosts -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e308", "86401", "0"])
@pytest.mark.parametrize(
    "setting", ["connect_timeout", "acse_timeout", "dimse_timeout", "network_timeout"]
)
def test_absurd_network_timeouts_are_refused_by_name(
    tmp_path: Path, setting: str, value: str
) -> None:
    errors = _errors(_config(tmp_path, f"{setting} = {value}"))
    assert [e.split(":")[0] for e in errors] == [f"destinations.0.{setting}"], errors


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("retry", "max_seconds"),
        ("retry", "max_age_seconds"),
        ("watch", "settle_seconds"),
        ("health", "stall_seconds"),
        ("sender", "linger_seconds"),
        ("", "shutdown_timeout"),
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e308"])
def test_absurd_durations_are_refused_by_name(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    setting = f"{table}.{key}" if table else key
    env = {f"FORWARDER_{setting.upper().replace('.', '__')}": value}
    errors = _errors(_config(tmp_path), env)
    assert [e.split(":")[0] for e in errors] == [setting], errors


def test_sane_durations_still_load(tmp_path: Path) -> None:
    settings = load_settings(
        _config(tmp_path, "dimse_timeout = 86400\nconnect_timeout = 0.5"),
        env={"FORWARDER_RETRY__MAX_AGE_SECONDS": "2592000"},
    )
    assert settings.destinations[0].dimse_timeout == 86400
    assert settings.retry.max_age_seconds == 2592000


@pytest.mark.parametrize("host", ["", " ", "\t", "pacs example", "pa\ncs"])
def test_blank_hosts_are_refused(tmp_path: Path, host: str) -> None:
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"', f"host = {json.dumps(host)}"))
    errors = _errors(cfg)
    assert [e.split(":")[0] for e in errors] == ["destinations.0.host"], errors


def test_host_is_stripped(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"', 'host = " pacs.example.org "'))
    assert load_settings(cfg, env={}).destinations[0].host == "pacs.example.org"


# -- 15: TLS files ---------------------------------------------------------------------------


def _cert_files() -> Path:
    import pynetdicom

    return Path(pynetdicom.__file__).parent / "tests" / "cert_files"


def test_check_tls_names_each_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    cfg = _config(
        tmp_path,
        f'[destinations.tls]\nca = "{missing}/ca.pem"\ncert = "{missing}/c.pem"\n'
        f'key = "{_cert_files() / "client.key"}"',
    )
    errors = check_tls(load_settings(cfg, env={}))
    assert errors == [
        f"destinations.0.tls.ca: file not found: {missing}/ca.pem",
        f"destinations.0.tls.cert: file not found: {missing}/c.pem",
    ]


def test_check_tls_names_a_file_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    cfg = _config(tmp_path, f'[destinations.tls]\nca = "{junk}"')
    (error,) = check_tls(load_settings(cfg, env={}))
    assert error.startswith(f"destinations.0.tls.ca: not a PEM CA bundle: {junk}")
    certs = _cert_files()
    cfg = _config(
        tmp_path,
        f'[destinations.tls]\nca = "{certs / "server.crt"}"\ncert = "{certs / "client.crt"}"\n'
        f'key = "{certs / "client.key"}"',
    )
    assert check_tls(load_settings(cfg, env={})) == []


def _run(cfg: Path | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "forwarder", "run"]
    if cfg is not None:
        argv += ["--config", str(cfg)]
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={**_clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_run_with_a_missing_tls_file_exits_78_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    cfg = _config(tmp_path, f'[destinations.tls]\nca = "{missing}"')
    proc = _run(cfg)
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"forwarder: config error: {cfg}: destinations.0.tls.ca: file not found: {missing}"
    )
    assert not (tmp_path / "state").exists()  # nothing started


def test_run_with_an_infinite_timeout_exits_78_naming_it(tmp_path: Path) -> None:
    proc = _run(_config(tmp_path, "dimse_timeout = inf"))
    assert proc.returncode == 78, proc.stderr
    assert "destinations.0.dimse_timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- 13: umask --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bits"), [("0027", 0o027), ("027", 0o027), ("0077", 0o077)])
def test_parse_umask(text: str, bits: int) -> None:
    assert parse_umask(text) == bits


@pytest.mark.parametrize("text", ["27", "0o027", "0828", "", "0727", "0477", "00027", "abc"])
def test_parse_umask_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_umask(text)


def test_umask_setting(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path), env={}).umask_bits == 0o027
    assert load_settings(_config(tmp_path, top='umask = "0077"'), env={}).umask_bits == 0o077
    env = {"FORWARDER_UMASK": "0007"}
    assert load_settings(_config(tmp_path), env=env).umask_bits == 0o007
    for bad in ("umask = 27", "umask = 0o027", 'umask = "0700"'):
        errors = _errors(_config(tmp_path, top=bad))
        assert [e.split(":")[0] for e in errors] == ["umask"], errors


# -- 17: the environment -------------------------------------------------------------------


def test_environment_alone_builds_a_destination_list() -> None:
    env = {
        "FORWARDER_DESTINATIONS__0__NAME": "pacs",
        "FORWARDER_DESTINATIONS__0__HOST": "pacs.example.org",
        "FORWARDER_DESTINATIONS__0__PORT": "104",
        "FORWARDER_DESTINATIONS__0__CALLED_AET": "12345",
        "FORWARDER_DESTINATIONS__1__NAME": "archive",
        "FORWARDER_DESTINATIONS__1__HOST": "10.0.0.2",
        "FORWARDER_DESTINATIONS__1__PORT": "11112",
        "FORWARDER_DESTINATIONS__1__TLS__VERIFY": "false",
        "FORWARDER_WATCH__PATHS": '["/inbox"]',
        "FORWARDER_WATCH__POLL": "true",
    }
    settings = load_settings(None, env=env, require_destinations=True)
    pacs, archive = settings.destinations
    assert (pacs.name, pacs.host, pacs.port, pacs.called_aet) == (
        "pacs",
        "pacs.example.org",
        104,
        "12345",
    )
    assert archive.tls is not None and archive.tls.verify is False
    assert settings.watch.paths == [Path("/inbox")]
    assert settings.watch.poll is True


@pytest.mark.parametrize(
    ("var", "value", "attr"),
    [
        ("FORWARDER_DESTINATIONS__0__CALLED_AET", "12345", "called_aet"),
        ("FORWARDER_DESTINATIONS__0__CALLING_AET", "true", "calling_aet"),
        ("FORWARDER_DESTINATIONS__0__HOST", "10", "host"),
        ("FORWARDER_DESTINATIONS__0__NAME", "1.5", "name"),
    ],
)
def test_text_settings_that_look_like_json_stay_text(
    tmp_path: Path, var: str, value: str, attr: str
) -> None:
    settings = load_settings(_config(tmp_path), env={var: value})
    assert getattr(settings.destinations[0], attr) == value


def test_list_settings_are_json(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path), env={"FORWARDER_WATCH__IGNORE": '["*.tmp", "x"]'})
    assert settings.watch.ignore == ["*.tmp", "x"]
    errors = _errors(_config(tmp_path), {"FORWARDER_WATCH__PATHS": "/inbox"})
    assert errors == [
        "FORWARDER_WATCH__PATHS: a list or table is written as JSON here, e.g. '[\"/inbox\"]'"
    ]


def test_no_config_file_and_no_environment_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"FORWARDER_CONFIG": ""})
    assert info.value.errors == [NO_CONFIG]
    assert info.value.lines() == ["no config file: pass --config or set FORWARDER_CONFIG"]


@pytest.mark.parametrize("command", [["run"], ["status"], ["health"], ["config", "check"]])
def test_commands_without_any_config_say_so(command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", *command],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert "no config file: pass --config or set FORWARDER_CONFIG" in proc.stderr
    assert "valid list" not in proc.stderr


@pytest.fixture
def env_daemon(tmp_path: Path, scp: SCP) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    inbox = tmp_path / "inbox"
    log = tmp_path / "daemon.log"
    env = {
        **_clean_env(),
        "FORWARDER_WATCH__PATHS": f'["{inbox}"]',
        "FORWARDER_WATCH__SETTLE_SECONDS": "0.2",
        "FORWARDER_QUARANTINE__DIR": str(tmp_path / "quarantine"),
        "FORWARDER_OUTBOX__PATH": str(tmp_path / "state" / "outbox.sqlite3"),
        "FORWARDER_LOG__TARGET": "stderr",
        "FORWARDER_SHUTDOWN_TIMEOUT": "10",
        "FORWARDER_DESTINATIONS__0__NAME": "pacs",
        "FORWARDER_DESTINATIONS__0__HOST": "127.0.0.1",
        "FORWARDER_DESTINATIONS__0__PORT": str(scp.port),
        "FORWARDER_DESTINATIONS__0__CALLED_AET": "12345",
    }
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_daemon_configured_by_the_environment_alone_sends(
    tmp_path: Path, scp: SCP, env_daemon: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, log = env_daemon

    def watching() -> bool:
        assert proc.poll() is None, log.read_text()
        return "watching" in log.read_text()

    wait_for(watching, 20)
    uid = "1.2.826.0.1.3680043.10.999.17.1"
    make_instance(tmp_path / "inbox" / "a.dcm", uid)
    wait_for(lambda: uid in scp.uids(), 20)
    proc.terminate()
    assert proc.wait(20) == 0
    assert "Traceback" not in log.read_text()
