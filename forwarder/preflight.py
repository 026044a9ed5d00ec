"""Checks of a config that no schema can see (overlapping folders, TLS files), before a start."""

from __future__ import annotations

import ssl
from pathlib import Path

from forwarder.config import ConfigError, Settings, load_settings

__all__ = ["check_auth", "check_layout", "check_receive", "check_tls", "load_for_daemon"]


def load_for_daemon(path: Path | None) -> Settings:
    """Settings for the daemon: schema, layout and TLS files; raises ConfigError listing all."""
    settings = load_settings(path, require_destinations=True)
    errors = (
        check_layout(settings)
        + check_tls(settings)
        + check_auth(settings)
        + check_receive(settings)
    )
    if errors:
        raise ConfigError(str(path) if path else "environment", errors)
    return settings


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_layout(settings: Settings) -> list[str]:
    """Config errors no schema can see: folders that would feed the daemon its own output."""
    errors = []
    for root in settings.watch.paths:
        if _overlaps(root, settings.quarantine.dir):
            errors.append(
                f"quarantine.dir: {settings.quarantine.dir} overlaps the watched folder {root}"
            )
        if settings.disposition.on_success == "move" and _overlaps(
            root, settings.disposition.archive_dir
        ):
            errors.append(
                f"disposition.archive_dir: {settings.disposition.archive_dir} overlaps the "
                f"watched folder {root}"
            )
    if not settings.watch.paths:
        errors.append("watch.paths: at least one folder to watch is required")
    if settings.receive.enabled:
        received = settings.receive.dir
        others = [(f"the watched folder {root}", root) for root in settings.watch.paths]
        others.append((f"quarantine.dir {settings.quarantine.dir}", settings.quarantine.dir))
        if settings.disposition.on_success == "move":
            archive = settings.disposition.archive_dir
            others.append((f"disposition.archive_dir {archive}", archive))
        others.append((f"the outbox {settings.outbox.path}", settings.outbox.path))
        for what, other in others:
            if _overlaps(received, other):
                errors.append(f"receive.dir: {received} overlaps {what}")
    return errors


def check_receive(settings: Settings) -> list[str]:
    """The receiver's address and TLS files (when it is on); one line per problem."""
    from forwarder.metrics import parse_listen

    rcv = settings.receive
    if rcv.listen is None:
        return []
    errors: list[str] = []
    try:
        parse_listen(rcv.listen)
    except ValueError as exc:
        errors.append(f"receive.listen: {exc}")
    if rcv.tls is not None:
        files = {"cert": rcv.tls.cert, "key": rcv.tls.key, "ca": rcv.tls.ca}
        problems = [
            f"receive.tls.{name}: {problem}: {path}"
            for name, path in files.items()
            if path is not None and (problem := _file_problem(path)) is not None
        ]
        errors += problems
        if not problems:
            from forwarder.receiver import server_context

            try:
                server_context(rcv.tls)
            except (ssl.SSLError, OSError) as exc:
                errors.append(
                    f"receive.tls: cannot load the certificate {rcv.tls.cert} with the key "
                    f"{rcv.tls.key} or the CA {rcv.tls.ca} ({exc})"
                )
    return errors


def check_tls(settings: Settings) -> list[str]:
    """The TLS files of every destination, loaded as the sender will; one line per problem.

    A missing, unreadable or malformed CA, certificate or key is named by its setting
    (``destinations.0.tls.ca: file not found: /etc/forwarder/ca.pem``). Kept out of the
    schema so that `forwarder config show` and the operator commands still work on a host
    without the files.
    """
    errors: list[str] = []
    for i, dest in enumerate(settings.destinations):
        tls = dest.tls
        if tls is None:
            continue
        files = {"ca": tls.ca, "cert": tls.cert, "key": tls.key}
        bad = False
        for name, path in files.items():
            if path is None:
                continue
            problem = _file_problem(path)
            if problem is not None:
                errors.append(f"destinations.{i}.tls.{name}: {problem}: {path}")
                bad = True
        if bad:
            continue
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if tls.ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(tls.ca))
            except (ssl.SSLError, OSError) as exc:
                errors.append(f"destinations.{i}.tls.ca: not a PEM CA bundle: {tls.ca} ({exc})")
        if tls.cert is not None:
            try:
                ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
            except (ssl.SSLError, OSError) as exc:
                errors.append(
                    f"destinations.{i}.tls.cert: cannot load the certificate {tls.cert} "
                    f"with the key {tls.key} ({exc})"
                )
    return errors


def check_auth(settings: Settings) -> list[str]:
    """The secret files of every DICOMweb destination's ``[destinations.auth]``, one line per
    file that cannot be read (``destinations.0.auth.token_file: file not found: ...``)."""
    errors: list[str] = []
    for i, dest in enumerate(settings.destinations):
        auth = dest.auth
        if auth is None:
            continue
        files = {
            "password_file": auth.password_file,
            "token_file": auth.token_file,
            "client_secret_file": auth.client_secret_file,
        }
        for name, path in files.items():
            problem = None if path is None else _file_problem(path)
            if problem is not None:
                errors.append(f"destinations.{i}.auth.{name}: {problem}: {path}")
    return errors


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None."""
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "a folder, not a file"
    except PermissionError:
        return "not readable (permission denied)"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
