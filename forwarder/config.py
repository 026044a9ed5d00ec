"""Settings: the TOML config file with ``FORWARDER_...`` environment overrides."""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from forwarder.concurrency import DEFAULT_MAX_ASSOCIATIONS, MAX_ASSOCIATIONS
from forwarder.errors import EX_CONFIG, ConfigError, add_config_argument
from forwarder.rulekeys import check_glob, rule_tag
from forwarder.transformspec import (
    TransformSpec,
    check_constant,
    check_remove_key,
    check_set_key,
    check_template,
)

__all__ = [
    "EX_CONFIG",
    "AuthSettings",
    "CommitmentSettings",
    "ConfigError",
    "Destination",
    "ReceiveSettings",
    "Settings",
    "TLSSettings",
    "add_config_argument",
    "flatten",
    "load_raw",
    "load_settings",
    "parse_umask",
]


ENV_PREFIX = "FORWARDER_"
_RAW: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("forwarder_raw_config")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_UMASK = re.compile(r"^0?[0-7]{3}$")
NO_CONFIG = "no config file: pass --config or set FORWARDER_CONFIG"

# Durations: finite, positive where a zero would spin, and bounded. `inf`, `nan` or 1e308
# seconds pass a bare `gt=0` and then overflow the clock and socket calls they reach
# (OverflowError in a thread, or a wait that never ends).
_MAX_SECONDS = 366 * 86400  # a year: longer is a typo, not a policy
_MAX_NETWORK_SECONDS = 86400  # a peer silent for a day is dead, whatever the setting says
Seconds = Annotated[float, Field(gt=0, le=_MAX_SECONDS, allow_inf_nan=False)]
SecondsOrZero = Annotated[float, Field(ge=0, le=_MAX_SECONDS, allow_inf_nan=False)]
_MAX_KEEP_DAYS = 100 * 366  # retention: a century is "forever", longer is a typo
NetworkSeconds = Annotated[float, Field(gt=0, le=_MAX_NETWORK_SECONDS, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


def _check_host(value: str) -> str:
    value = value.strip()
    if not value or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("a host name or IP address is required (no blanks or control characters)")
    return value


def parse_umask(value: str) -> int:
    """The file mode creation mask written as octal text (``"0027"``, ``"027"``), as an int.

    Raises ValueError unless it is 3 or 4 octal digits leaving the owner read and write:
    the daemon must be able to open what it creates.
    """
    if not _UMASK.match(value):
        raise ValueError('write the umask as 3 or 4 octal digits in quotes, e.g. "0027"')
    mask = int(value, 8)
    if mask & 0o600:
        raise ValueError("the umask must leave the owner read and write (0o0xx)")
    return mask


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError("an AE title is 1 to 16 printable ASCII characters without a backslash")
    return value


def _check_key(key: str) -> str:
    rule_tag(key)
    return key


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


RuleKey = Annotated[str, AfterValidator(_check_key)]
Globs = Annotated[
    list[Annotated[str, AfterValidator(check_glob)]],
    BeforeValidator(_one_or_many),
    Field(min_length=1),
]
"""A glob or a list of globs (any may match); read as a list."""


SetKey = Annotated[str, AfterValidator(check_set_key)]
RemoveKey = Annotated[str, AfterValidator(check_remove_key)]
Template = Annotated[str, AfterValidator(check_template)]
SyntaxName = Literal[
    "keep", "explicit-le", "implicit-le", "rle", "jpeg-ls-lossless", "jpeg2000-lossless"
]

# The Python modules a transform needs beyond the base install, and the extra that has them.
_NEEDS: dict[str, tuple[str, ...]] = {
    "deidentify": ("dicognito",),
    "explicit-le": (),
    "implicit-le": (),
    "rle": ("numpy",),
    "jpeg-ls-lossless": ("numpy", "jpeg_ls"),
    "jpeg2000-lossless": ("numpy", "openjpeg"),
}


class DestinationTransform(_Model):
    """What a destination gets, changed (``[destinations.transform]``)."""

    # keyword or "GGGG,EEEE" -> value; "{Keyword}" in it is the instance's original value
    set: dict[SetKey, Template] = {}
    remove: list[RemoveKey] = []
    # PS3.15 E.1 Basic Application Level Confidentiality Profile
    deidentify: Literal["none", "basic"] = "none"
    transfer_syntax: SyntaxName = "keep"  # lossless only
    # send instances with BurnedInAnnotation = YES de-identified anyway (pixels are not cleaned)
    allow_burned_in: bool = False

    @field_validator("set")
    @classmethod
    def _constants(cls, value: dict[str, str]) -> dict[str, str]:
        for key, template in value.items():
            check_constant(key, template)
        return value

    @model_validator(mode="after")
    def _installed(self) -> DestinationTransform:
        import importlib.util

        wanted = [*_NEEDS.get(self.transfer_syntax, ())]
        if self.deidentify != "none":
            wanted += _NEEDS["deidentify"]
        missing = [m for m in wanted if importlib.util.find_spec(m) is None]
        if missing:
            what = "deidentify" if "dicognito" in missing else "transfer_syntax"
            raise ValueError(
                f"{what}: needs the Python module(s) {', '.join(missing)}: install "
                "dicom-forwarder[transform]"
            )
        return self

    def spec(self) -> TransformSpec:
        return TransformSpec(
            set=tuple(self.set.items()),
            remove=tuple(self.remove),
            deidentify=self.deidentify,
            transfer_syntax=self.transfer_syntax,
            allow_burned_in=self.allow_burned_in,
        )


class TransformSettings(_Model):
    # processes that decode, change and encode instances for destinations with a transform
    # (started at the first one); default: the machine's CPU count
    workers: int | None = Field(default=None, ge=1, le=256)

    @property
    def pool_size(self) -> int:
        return self.workers or os.cpu_count() or 1


class RoutingSettings(_Model):
    # an instance no destination wants: quarantined with the reason, or disposed of as a
    # delivered file is (disposition.on_success)
    unmatched: Literal["quarantine", "dispose"] = "quarantine"


class AuthSettings(_Model):
    """How a DICOMweb destination authenticates (``[destinations.auth]``); secrets live in
    files, read again whenever they change (a rotated token needs no reload)."""

    type: Literal["none", "basic", "bearer", "oauth2-client-credentials"] = "none"
    user: str | None = None  # basic
    password_file: Path | None = None  # basic
    token_file: Path | None = None  # bearer
    token_url: str | None = None  # oauth2-client-credentials
    client_id: str | None = None
    client_secret_file: Path | None = None
    scope: str | None = None

    @model_validator(mode="after")
    def _required(self) -> AuthSettings:
        needs: dict[str, tuple[str, ...]] = {
            "none": (),
            "basic": ("user", "password_file"),
            "bearer": ("token_file",),
            "oauth2-client-credentials": ("token_url", "client_id", "client_secret_file"),
        }
        missing = [k for k in needs[self.type] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"auth type {self.type!r} needs {', '.join(missing)}")
        if self.token_url is not None:
            _check_url(self.token_url)
        return self


def _check_url(value: str) -> str:
    """An http(s) URL with a host; returned without a trailing slash."""
    from urllib.parse import urlsplit

    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host is required")
    if parts.query or parts.fragment:
        raise ValueError("the base URL takes no ?query or #fragment")
    return value.rstrip("/")


def _dicomweb_address(data: Any) -> Any:
    """A DICOMweb destination's host and port, from its URL (its DIMSE settings are unused)."""
    if not isinstance(data, dict) or data.get("type") != "dicomweb":
        return data
    from urllib.parse import urlsplit

    for key in ("host", "port", "called_aet", "calling_aet"):
        if key in data:
            raise ValueError(f"{key}: not used by a dicomweb destination (url names the server)")
    unknown = {**data, "host": "invalid", "port": 1}  # the url's own check says what is wrong
    url = data.get("url")
    if not isinstance(url, str):
        return unknown
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return unknown
    if not parts.hostname:
        return unknown
    default = 443 if parts.scheme == "https" else 80
    return {**data, "host": parts.hostname, "port": port or default}


class CommitmentSettings(_Model):
    """Storage Commitment before disposal (``[destinations.commitment]``)."""

    # true: after storing, ask the peer to commit (N-ACTION); the source is disposed of only
    # once it reports every instance committed
    enabled: bool = False
    # no report by then: ask again (not a resend), counted under [retry]
    timeout_seconds: Seconds = 3600


class Destination(_Model):
    """One DICOM peer, and which instances it gets (every one, unless rules say otherwise)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    # "dimse": C-STORE to host:port; "dicomweb": STOW-RS to url (host and port come from it)
    type: Literal["dimse", "dicomweb"] = "dimse"
    url: str | None = None  # the DICOMweb base: STOW-RS is POST {url}/studies
    batch_size: int = Field(default=50, ge=1, le=10000)  # dicomweb: instances per request
    max_request_mb: float = Field(default=64, gt=0, le=4096, allow_inf_nan=False)
    timeout_seconds: NetworkSeconds = 120  # dicomweb: per request (connect, send, answer)
    auth: AuthSettings | None = None  # dicomweb only
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    called_aet: str = "ANY-SCP"
    calling_aet: str = "FORWARDER"
    associations: int | Literal["auto"] = "auto"
    max_associations: int = Field(default=DEFAULT_MAX_ASSOCIATIONS, ge=1, le=MAX_ASSOCIATIONS)
    max_pdu: int = Field(default=0, ge=0)
    connect_timeout: NetworkSeconds = 10
    acse_timeout: NetworkSeconds = 30
    dimse_timeout: NetworkSeconds = 30
    network_timeout: NetworkSeconds = 60
    tls: TLSSettings | None = None
    # rule key (keyword, "GGGG,EEEE" or path) -> glob(s); every match rule must match, any
    # exclude rule excludes
    match: dict[RuleKey, Globs] = {}
    exclude: dict[RuleKey, Globs] = {}
    transform: DestinationTransform | None = None
    commitment: CommitmentSettings = CommitmentSettings()

    _aet = field_validator("called_aet", "calling_aet")(_check_ae)
    _host = field_validator("host")(_check_host)
    _address = model_validator(mode="before")(_dicomweb_address)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @model_validator(mode="after")
    def _dicomweb(self) -> Destination:
        if self.type == "dicomweb":
            if self.url is None:
                raise ValueError("url: required for a dicomweb destination")
            if self.tls is not None and self.tls.server_name is not None:
                raise ValueError("tls.server_name: not used by a dicomweb destination")
            if self.commitment.enabled:
                raise ValueError(
                    "commitment: Storage Commitment is DICOM's (N-ACTION): not for a dicomweb "
                    "destination, whose 200/202 answer already lists what was stored"
                )
        else:
            extra = [k for k in ("url", "auth") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for a dicomweb destination")
        return self

    @field_validator("associations")
    @classmethod
    def _associations(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_ASSOCIATIONS:
            raise ValueError(f'a number from 1 to {MAX_ASSOCIATIONS}, or "auto"')
        return value

    @property
    def address(self) -> str:
        """Where it sends, for people: ``called_aet@host:port``, or a dicomweb destination's url."""
        if self.type == "dicomweb" and self.url is not None:
            return self.url
        return f"{self.called_aet}@{self.host}:{self.port}"

    @property
    def transform_spec(self) -> TransformSpec | None:
        """The destination's transform; None when it sends the files' own bytes (no
        ``[destinations.transform]``, or one that changes nothing)."""
        if self.transform is None:
            return None
        spec = self.transform.spec()
        return None if spec.changes_nothing else spec


class WatchSettings(_Model):
    paths: list[Path] = [Path("/var/spool/forwarder/inbox")]
    recursive: bool = True
    poll: bool = False
    poll_interval_seconds: Seconds = 2.0
    settle_seconds: SecondsOrZero = 1.0
    settle_from_mtime: bool = True
    rescan_seconds: Seconds = 300
    invalid_grace_seconds: SecondsOrZero = 30
    ignore: list[str] = [".*", "*.part", "*.tmp", "*.partial"]
    follow_symlinks: bool = False


class OutboxSettings(_Model):
    path: Path = Path("/var/lib/forwarder/outbox.sqlite3")
    lease_seconds: Seconds = 300
    # delivered rows older than this are deleted; 0 keeps them forever
    keep_sent_days: float = Field(default=30, ge=0, le=_MAX_KEEP_DAYS, allow_inf_nan=False)

    @property
    def keep_sent_seconds(self) -> float:
        """`keep_sent_days` in seconds (0: delivered rows are kept forever)."""
        return self.keep_sent_days * 86400


class RetrySettings(_Model):
    initial_seconds: Seconds = 5
    max_seconds: Seconds = 600
    max_attempts: int = Field(default=20, ge=1)
    max_age_seconds: Seconds = 86400


class DispositionSettings(_Model):
    on_success: Literal["delete", "move", "keep"] = "delete"
    archive_dir: Path = Path("/var/spool/forwarder/sent")


class QuarantineSettings(_Model):
    dir: Path = Path("/var/spool/forwarder/quarantine")


class SenderSettings(_Model):
    batch_size: int = Field(default=64, ge=1, le=10000)
    linger_seconds: SecondsOrZero = 5


class LogSettings(_Model):
    level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    format: Literal["text", "json"] = "text"
    target: Literal["auto", "stderr", "journal"] = "auto"
    summary_seconds: Seconds = 60


class ReceiveTLSSettings(_Model):
    """TLS for the receiver (``[receive.tls]``): our certificate, and whose we trust."""

    cert: Path
    key: Path
    ca: Path | None = None  # the CA bundle client certificates are checked against
    require_client_cert: bool = False  # true: a modality without a certificate from `ca` fails

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ReceiveTLSSettings:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the CA the clients' certificates have)")
        return self


AETitle = Annotated[str, AfterValidator(_check_ae)]
MAX_RECEIVE_ASSOCIATIONS = 256


class ReceiveSettings(_Model):
    """The DICOM receiver (C-STORE SCP); off unless `listen` is set."""

    listen: str | None = None  # "0.0.0.0:11112", "[::]:11112"; a bare port binds 127.0.0.1
    ae_title: AETitle = "FORWARDER"  # the called AE title we answer to; others are rejected
    allowed_calling_aets: list[AETitle] = []  # empty: any (a warning at start-up)
    max_associations: int = Field(default=16, ge=1, le=MAX_RECEIVE_ASSOCIATIONS)
    dir: Path = Path("/var/spool/forwarder/received")  # received instances until disposed of
    tls: ReceiveTLSSettings | None = None

    @property
    def enabled(self) -> bool:
        return self.listen is not None


class MetricsSettings(_Model):
    listen: str | None = None  # "127.0.0.1:9108"; absent = off


class HealthSettings(_Model):
    heartbeat_seconds: Seconds = 5
    stale_seconds: Seconds = 60
    max_paused_seconds: Seconds = 3600
    # a worker in a batch with no store answered for longer than this is wedged (no
    # WATCHDOG=1, health fails); a wait for a transform may take 1 s per MB of its file more;
    # default: twice the slowest destination's dimse_timeout + network_timeout, plus 60 s
    stall_seconds: Seconds | None = None


class Settings(BaseSettings):
    """Everything the forwarder reads from its config file and environment."""

    model_config = SettingsConfigDict(
        env_prefix="FORWARDER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
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
    routing: RoutingSettings = RoutingSettings()
    transform: TransformSettings = TransformSettings()
    receive: ReceiveSettings = ReceiveSettings()
    shutdown_timeout: Seconds = 30
    # file mode creation mask of the daemon (outbox, sidecars, copies, folders it creates)
    umask: str = "0027"

    @field_validator("umask", mode="before")
    @classmethod
    def _umask(cls, value: Any) -> str:
        if not isinstance(value, str):  # a TOML integer: 27 and 0o27 read the same here
            raise ValueError('write the umask as octal digits in quotes, e.g. "0027"')
        parse_umask(value)
        return value

    @property
    def umask_bits(self) -> int:
        """`umask` as the number ``os.umask`` takes."""
        return parse_umask(self.umask)

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


def _unwrap(annotation: Any) -> Any:
    """`annotation` without ``Annotated[...]`` and ``... | None``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _child(annotation: Any, part: str) -> Any:
    """The type of `part` (a field name or list index) inside `annotation`; None if unknown."""
    ann = _unwrap(annotation)
    if typing.get_origin(ann) is list:
        return typing.get_args(ann)[0] if part.isdigit() else None
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        field = ann.model_fields.get(part)
        return None if field is None else field.annotation
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_unwrap(annotation)) is list


def _is_structured(annotation: Any) -> bool:
    """A list, a table (model) or a mapping: written as JSON in the environment."""
    ann = _unwrap(annotation)
    if typing.get_origin(ann) in (list, dict):
        return True
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _env_value(var: str, text: str, annotation: Any, errors: list[str]) -> Any:
    """An environment value: JSON for list and table settings, the text as is for the rest.

    Scalars stay text and pydantic converts them ("104" -> 104, "true" -> True), so an AE
    title or a host that happens to look like a number (``12345``) stays a string.
    """
    if not _is_structured(annotation):
        return text
    try:
        return json.loads(text)
    except ValueError:
        errors.append(f"{var}: a list or table is written as JSON here, e.g. '[\"/inbox\"]'")
        return text


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: dict[str, str]) -> list[str]:
    """Merge ``FORWARDER_A__B__0__C`` variables into `raw`; return lines for unusable ones.

    The settings schema says what each level is: a missing list (``destinations``) is
    created as a list, a missing table as a table, whatever the file had or had not.
    """
    errors: list[str] = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var == "FORWARDER_CONFIG":
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        node: Any = raw
        ann: Any = Settings
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            ann = _child(ann, part)
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    errors.append(f"{var}: list index {part!r} is not 0..{len(node)}")
                    break
                idx = int(part)
                if idx == len(node):
                    node.append([] if _is_list(ann) else {})
                if last:
                    node[idx] = _env_value(var, env[var], ann, errors)
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = _env_value(var, env[var], ann, errors)
                else:
                    node = node.setdefault(part, [] if _is_list(ann) else {})
            else:
                errors.append(f"{var}: {'.'.join(parts[:depth])} is not a table")
                break
        else:
            origin[".".join(parts)] = f"environment ({var})"
    return errors


def has_env_settings(env: Mapping[str, str]) -> bool:
    """True when `env` holds at least one ``FORWARDER_...`` setting (not FORWARDER_CONFIG)."""
    return any(k.startswith(ENV_PREFIX) and k != "FORWARDER_CONFIG" for k in env)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"dotted.key": leaf}``; a list of tables is keyed by index.

    ``{"destinations": [{"name": "pacs"}]}`` gives ``{"destinations.0.name": "pacs"}``. An
    empty table has no leaf, so it gives nothing.
    """
    flat: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for idx, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}.{idx}"))
    else:
        flat[prefix] = value
    return flat


def load_raw(
    path: Path | str | None, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the merged file + environment settings as plain data, and where each came from.

    With no file (`path` None) the environment alone is the configuration, provided it
    holds at least one ``FORWARDER_...`` setting.

    Raises
    ------
    ConfigError
        When the file is missing, unreadable or not TOML, a variable cannot be applied, or
        there is neither a file nor a ``FORWARDER_...`` setting.
    """
    env = os.environ if env is None else env
    source = str(path) if path is not None else "environment"
    if path is None and not has_env_settings(env):
        raise ConfigError("", [NO_CONFIG])
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
        origin.update(dict.fromkeys(flatten(raw), f"file ({cfg})"))
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
    are addressed by index (``FORWARDER_DESTINATIONS__0__PORT=104``). Values of list and
    table settings are JSON (``FORWARDER_WATCH__PATHS='["/in"]'``); every other value is
    text, converted by the schema. Without a file the environment alone may configure
    everything (`load_raw`).

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
