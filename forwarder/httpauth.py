"""HTTP credentials of a DICOMweb destination: the Authorization header, secrets read from files.

A secret file (bearer token, password, OAuth2 client secret) is read again whenever it
changes (inode, size or modification time), so a token rotated on disk is used by the next
request without a reload. An OAuth2 access token (client credentials grant, RFC 6749 4.4) is
kept until shortly before it expires, or until the server refuses it.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forwarder.config import AuthSettings

if TYPE_CHECKING:
    import httpx

__all__ = ["Credentials", "CredentialsError", "SecretFile"]

LOGGER = logging.getLogger("forwarder.httpauth")

EXPIRY_MARGIN_SECONDS = 30.0
"""An OAuth2 access token is fetched again this long before it expires."""
DEFAULT_TOKEN_SECONDS = 300.0
"""How long an access token without ``expires_in`` is used."""


class CredentialsError(Exception):
    """The credentials cannot be had (a secret file unreadable, the token endpoint refusing):
    one line naming the setting."""


class SecretFile:
    """A secret kept in a file; `value()` reads it again when the file changed."""

    def __init__(self, path: Path, setting: str) -> None:
        self.path = path
        self.setting = setting
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""
        self._lock = threading.Lock()

    def value(self) -> str:
        """The file's content without surrounding blanks.

        Raises
        ------
        CredentialsError
            The file cannot be read or is empty.
        """
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if stamp != self._stamp:
                    text = self.path.read_text(encoding="utf-8").strip()
                    if not text:
                        raise CredentialsError(f"{self.setting}: {self.path} is empty")
                    if self._stamp is not None:
                        LOGGER.info(f"{self.setting}: {self.path} changed: read again")
                    self._value, self._stamp = text, stamp
            except OSError as exc:
                raise CredentialsError(
                    f"{self.setting}: cannot read {self.path}: {exc.strerror or exc}"
                ) from None
            except UnicodeDecodeError:
                raise CredentialsError(f"{self.setting}: {self.path} is not UTF-8 text") from None
            return self._value


@dataclass
class _Token:
    value: str
    expires_at: float  # monotonic


class Credentials:
    """The Authorization header value for one destination's requests (None: no header).

    Thread-safe; one per sender.
    """

    def __init__(self, auth: AuthSettings | None, setting: str = "auth") -> None:
        self.auth = auth or AuthSettings()
        self.setting = setting
        a = self.auth
        self._password = (
            SecretFile(a.password_file, f"{setting}.password_file") if a.password_file else None
        )
        self._token_file = (
            SecretFile(a.token_file, f"{setting}.token_file") if a.token_file else None
        )
        self._client_secret = (
            SecretFile(a.client_secret_file, f"{setting}.client_secret_file")
            if a.client_secret_file
            else None
        )
        self._token: _Token | None = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return self.auth.type

    def header(self, client: httpx.Client) -> str | None:
        """The current Authorization value (reads changed files; fetches an OAuth2 token
        with `client` when none is held or it is about to expire).

        Raises
        ------
        CredentialsError
            The secret or the token cannot be had.
        """
        kind = self.auth.type
        if kind == "basic":
            assert self._password is not None and self.auth.user is not None
            raw = f"{self.auth.user}:{self._password.value()}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if kind == "bearer":
            assert self._token_file is not None
            return f"Bearer {self._token_file.value()}"
        if kind == "oauth2-client-credentials":
            return f"Bearer {self._access_token(client)}"
        return None

    def refused(self) -> None:
        """The server refused the credentials: an OAuth2 token is fetched anew next time
        (files are read again anyway when they change)."""
        with self._lock:
            self._token = None

    def _access_token(self, client: httpx.Client) -> str:
        with self._lock:
            token = self._token
            if token is not None and time.monotonic() < token.expires_at:
                return token.value
            self._token = token = self._fetch(client)
            return token.value

    def _fetch(self, client: httpx.Client) -> _Token:
        import httpx

        a = self.auth
        assert a.token_url is not None and a.client_id is not None
        assert self._client_secret is not None
        form = {
            "grant_type": "client_credentials",
            "client_id": a.client_id,
            "client_secret": self._client_secret.value(),
        }
        if a.scope:
            form["scope"] = a.scope
        where = f"{self.setting}.token_url"
        try:
            rsp = client.post(a.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise CredentialsError(f"{where}: {a.token_url}: {exc or type(exc).__name__}") from None
        if rsp.status_code != 200:
            raise CredentialsError(f"{where}: {a.token_url} answered HTTP {rsp.status_code}")
        try:
            data = rsp.json()
            value = str(data["access_token"])
            lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, KeyError, TypeError):
            raise CredentialsError(f"{where}: the answer has no access_token") from None
        LOGGER.info(f"{where}: new access token for {lifetime:.0f} s")
        margin = min(EXPIRY_MARGIN_SECONDS, lifetime / 2)
        return _Token(value, time.monotonic() + lifetime - margin)
