"""Settings: the TOML config file with ``FORWARDER_...`` environment overrides."""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from forwarder.concurrency import DEFAULT_MAX_ASSOCIATIONS, MAX_ASSOCIATIONS
from forwarder.errors import EX_CONFIG, ConfigError, add_config_argument

__all__ = [
    "EX_CONFIG",
    "ConfigError",
    "Destination",
    "Settings",
    "TLSSettings",
    "add_config_argument",
    "load_raw",
    "load_settings",
]


ENV_PREFIX = "FORWARDER_"
_RAW: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("forwarder_raw_config")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Model):
    """TLS for one destination; absent means plain TCP."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    verify: bool = True

    @model_validator(mode="after")
    def _cert_and_key(self) -> TLSSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters without a backslash")
    return value


class Destination(_Model):
    """One DICOM peer that receives every instance."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    called_aet: str = "ANY-SCP"
    calling_aet: str = "FORWARDER"
    associations: int | Literal["auto"] = "auto"
    max_associations: int = Field(default=DEFAULT_MAX_ASSOCIATIONS, ge=1, le=MAX_ASSOCIATIONS)
    max_pdu: int = Field(default=0, ge=0)
    connect_timeout: float = Field(default=10, gt=0)
    acse_timeout: float = Field(default=30, gt=0)
    dimse_timeout: float = Field(default=30, gt=0)
    network_timeout: float = Field(default=60, gt=0)
    tls: TLSSettings | None = None

    _aet = field_validator("called_aet", "calling_aet")(_check_ae)

    @field_validator("associations")
    @classmethod
    def _associations(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_ASSOCIATIONS:
            raise ValueError(f'a number from 1 to {MAX_ASSOCIATIONS}, or "auto"')
        return value


class WatchSettings(_Model):
    paths: list[Path] = [Path("/var/spool/forwarder/inbox")]
    recursive: bool = True
    poll: bool = False
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    settle_seconds: float = Field(default=1.0, ge=0)
    settle_from_mtime: bool = True
    rescan_seconds: float = Field(default=300, gt=0)
    invalid_grace_seconds: float = Field(default=30, ge=0)
    ignore: list[str] = [".*", "*.part", "*.tmp", "*.partial"]
    follow_symlinks: bool = False


class OutboxSettings(_Model):
    path: Path = Path("/var/lib/forwarder/outbox.sqlite3")
    lease_seconds: float = Field(default=300, gt=0)


class RetrySettings(_Model):
    initial_seconds: float = Field(default=5, gt=0)
    max_seconds: float = Field(default=600, gt=0)
    max_attempts: int = Field(default=20, ge=1)
    max_age_seconds: float = Field(default=86400, gt=0)


class DispositionSettings(_Model):
    on_success: Literal["delete", "move", "keep"] = "delete"
    archive_dir: Path = Path("/var/spool/forwarder/sent")


class QuarantineSettings(_Model):
    dir: Path = Path("/var/spool/forwarder/quarantine")


class SenderSettings(_Model):
    batch_size: int = Field(default=64, ge=1, le=10000)
    linger_seconds: float = Field(default=5, ge=0)


class LogSettings(_Model):
    level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    format: Literal["text", "json"] = "text"
    target: Literal["auto", "stderr", "journal"] = "auto"
    summary_seconds: float = Field(default=60, gt=0)


class MetricsSettings(_Model):
    listen: str | None = None  # "127.0.0.1:9108"; absent = off


class HealthSettings(_Model):
    heartbeat_seconds: float = Field(default=5, gt=0)
    stale_seconds: float = Field(default=60, gt=0)
    max_paused_seconds: float = Field(default=3600, gt=0)
    # a worker busy with one batch longer than this is wedged (no WATCHDOG=1, health fails);
    # default: twice the slowest destination's dimse_timeout + network_timeout, plus 60 s
    stall_seconds: float | None = Field(default=None, gt=0)


class Settings(BaseSettings):
    """Everything the forwarder reads from its config file and environment."""

    model_config = SettingsConfigDict(
        env_prefix="FORWARDER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    destinations: list[Destination] = []
    watch: WatchSettings = WatchSettings()
    outbox: OutboxSettings = OutboxSettings()
    retry: RetrySettings = RetrySettings()
    disposition: DispositionSettings = DispositionSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    sender: SenderSettings = SenderSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    health: HealthSettings = HealthSettings()
    shutdown_timeout: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return self

    def destination(self, name: str) -> Destination:
        """Return the destination called `name`; raises KeyError naming the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise KeyError(f"no destination named {name!r} (configured: {known})")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file and the environment are merged by `load_settings` (list items can be
        # overridden by index there, e.g. FORWARDER_DESTINATIONS__0__HOST), then validated here.
        return (init_settings, _MergedSource(settings_cls))


class _MergedSource(PydanticBaseSettingsSource):
    """The TOML file merged with the ``FORWARDER_...`` environment by `load_settings`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _RAW.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_RAW.get({}))


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _env_value(text: str) -> Any:
    """An environment value: JSON when it parses as JSON (lists, numbers, booleans), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: dict[str, str]) -> list[str]:
    """Merge ``FORWARDER_A__B__0__C`` variables into `raw`; return lines for unusable ones."""
    errors = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == "FORWARDER_CONFIG":
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    errors.append(f"{var}: list index {part!r} is not 0..{len(node)}")
                    break
                idx = int(part)
                if idx == len(node):
                    node.append({})
                if last:
                    node[idx] = _env_value(env[var])
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = _env_value(env[var])
                else:
                    node = node.setdefault(part, {})
            else:
                errors.append(f"{var}: {'.'.join(parts[:depth])} is not a table")
                break
        else:
            origin[".".join(parts)] = f"environment ({var})"
    return errors


def _flatten(raw: Any, prefix: str, origin: dict[str, str], source: str) -> None:
    if isinstance(raw, dict):
        for key, value in raw.items():
            _flatten(value, f"{prefix}.{key}" if prefix else key, origin, source)
    elif isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        for idx, value in enumerate(raw):
            _flatten(value, f"{prefix}.{idx}", origin, source)
    else:
        origin[prefix] = source


def load_raw(
    path: Path | str | None, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the merged file + environment settings as plain data, and where each came from.

    Raises
    ------
    ConfigError
        When the file is missing, unreadable or not TOML, or a variable cannot be applied.
    """
    env = os.environ if env is None else env
    source = str(path) if path is not None else "environment"
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        cfg = Path(path)
        try:
            raw = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(source, [f"config file {cfg} does not exist"]) from exc
        except OSError as exc:
            raise ConfigError(source, [f"config file {cfg} is unreadable: {exc.strerror}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(source, [f"config file {cfg} is not valid TOML: {exc}"]) from exc
        _flatten(raw, "", origin, f"file ({cfg})")
    errors = _apply_env(raw, env, origin)
    if errors:
        raise ConfigError(source, errors)
    return raw, origin


def load_settings(
    path: Path | str | None,
    *,
    require_destinations: bool = False,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Load the settings from `path` (TOML) and the ``FORWARDER_...`` environment.

    Environment variables override the file; ``__`` separates nesting levels and list items
    are addressed by index (``FORWARDER_DESTINATIONS__0__PORT=104``). Values are parsed as
    JSON when they are JSON (``FORWARDER_WATCH__PATHS='["/in"]'``), otherwise taken as text.

    Raises
    ------
    ConfigError
        With one line per bad setting, each naming the setting.
    """
    source = str(path) if path is not None else "environment"
    raw, _ = load_raw(path, env)
    token = _RAW.set(raw)
    try:
        settings = Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
            lines.append(f"{_loc(err['loc'])}: {err['msg']}{shown}")
        raise ConfigError(source, lines) from exc
    finally:
        _RAW.reset(token)
    if require_destinations and not settings.destinations:
        raise ConfigError(source, ["destinations: at least one [[destinations]] entry is required"])
    return settings
