"""Optional API-key / bearer-token authentication, as pure ASGI middleware.

Keys come from PODSERVE_API_KEYS (comma- or whitespace-separated) and/or the file named by
PODSERVE_API_KEYS_FILE (a mounted Kubernetes Secret: one key per line, `#` comments). With
neither set, authentication is off. A client sends `Authorization: Bearer <key>` or
`X-API-Key: <key>`. Keys are never kept or compared in clear: the candidate's SHA-256 is
compared with every key's SHA-256 by hmac.compare_digest (equal lengths, no early exit), so
the time taken says nothing about how much of a key matched, or which one. The key file is
re-read when it changes (Secret rotation) without a restart. Health probes and the metrics
scrape can stay open (PODSERVE_AUTH_EXEMPT_HEALTH / _METRICS); everything else, `/docs` and
`/openapi.json` included, needs a key. Nothing here logs or echoes a credential.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from podserve.json_response import json_response
from podserve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
METRICS_PATHS = frozenset({"/metrics"})
RELOAD_CHECK_S = 5.0  # how often the key file's mtime is looked at
_SEPARATORS = re.compile(r"[\s,]+")
_CHALLENGE = 'Bearer realm="podserve"'


def parse_keys(text: str) -> list[str]:
    """Keys separated by commas, spaces or newlines; lines starting with `#` are comments."""
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [key for line in lines for key in _SEPARATORS.split(line) if key]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """The accepted keys, as SHA-256 digests; reloads the key file when it changes."""

    def __init__(self, inline: str | None, key_file: Path | None) -> None:
        self.inline = [_digest(key) for key in parse_keys(inline or "")]  # no clear text kept
        self.key_file = key_file
        self._stamp: tuple[int, int] | None = None
        self._checked = time.monotonic()
        self.digests = self._load()  # raises at start-up: a broken key file must not open up

    def _file_stamp(self) -> tuple[int, int]:
        assert self.key_file is not None
        stat = os.stat(self.key_file)  # follows the symlinks a Secret volume swaps atomically
        return stat.st_mtime_ns, stat.st_ino

    def _load(self) -> list[bytes]:
        digests = list(self.inline)
        if self.key_file is not None:
            try:
                self._stamp = self._file_stamp()
                text = self.key_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"cannot read PODSERVE_API_KEYS_FILE {self.key_file}: {type(exc).__name__}"
                ) from None
            from_file = [_digest(key) for key in parse_keys(text)]
            if not from_file:  # at start-up: stop the boot; on a reload: keep the current keys
                raise ValueError(f"PODSERVE_API_KEYS_FILE {self.key_file} holds no key")
            digests += from_file
        if not digests:
            raise ValueError("authentication is configured but no API key was found")
        return list(dict.fromkeys(digests))

    def maybe_reload(self) -> None:
        """At most every RELOAD_CHECK_S; a missing or empty file keeps the current keys."""
        now = time.monotonic()
        if self.key_file is None or now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            if self._file_stamp() == self._stamp:
                return
            self.digests = self._load()
        except (OSError, ValueError) as exc:
            log.warning(
                "API key file not reloaded; keeping the current keys", extra={"reason": str(exc)}
            )
            return
        log.info("API keys reloaded", extra={"keys": len(self.digests)})

    def accepts(self, candidate: str) -> bool:
        digest = _digest(candidate)
        matched = False
        for known in self.digests:  # every key is compared: no early exit
            matched |= hmac.compare_digest(known, digest)
        return matched


def credentials(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The bearer token and/or X-API-Key value a request carries (raw header bytes)."""
    found: list[str] = []
    for name, value in headers:
        # As UTF-8 (surrogateescape: any bytes), the encoding the keys are digested in: a
        # latin-1 reading turned a non-ASCII key into other bytes, which never matched.
        if name == b"authorization":
            scheme, _, token = value.decode("utf-8", "surrogateescape").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.decode("utf-8", "surrogateescape").strip())
    return found


_HOW = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def _what_is_missing(headers: list[tuple[bytes, bytes]]) -> str:
    """Why a request offered no credential, for its 401; never echoes what it sent (a key
    sent without its scheme is still a key)."""
    values = [value.strip() for name, value in headers if name == b"authorization"]
    if not values or not any(values):
        return _HOW
    scheme, space, _ = values[0].partition(b" ")
    if scheme.lower() == b"bearer":  # nothing after it (a token would have been taken)
        return f"the Authorization header's Bearer scheme carries no key: {_HOW}"
    if not space:  # `Authorization: <key>`: the scheme forgotten
        return (
            "the Authorization header needs the Bearer scheme: send 'Authorization: Bearer "
            "<key>', not the key alone, or 'X-API-Key: <key>'"
        )
    return f"only the Bearer scheme is accepted in the Authorization header: {_HOW}"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        self.keys.maybe_reload()
        offered = credentials(scope["headers"])
        if offered and any([self.keys.accepts(candidate) for candidate in offered]):
            await self.app(scope, receive, send)
            return
        await self._reject(scope, receive, send, missing=not offered)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, missing: bool) -> None:
        if missing:
            message = f"missing credentials: {_what_is_missing(scope['headers'])}"
            challenge = _CHALLENGE
        else:
            message = "invalid credentials"
            challenge = _CHALLENGE + ', error="invalid_token"'
        log.debug(
            "request rejected by authentication",
            extra={"path": scope["path"], "reason": "missing" if missing else "invalid"},
        )
        response = json_response({"error": message}, 401, {"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def open_paths(settings: Settings) -> frozenset[str]:
    paths: set[str] = set()
    if settings.auth_exempt_health:
        paths |= HEALTH_PATHS
    if settings.auth_exempt_metrics:
        paths |= METRICS_PATHS
    return frozenset(paths)


def api_keys(settings: Settings) -> ApiKeys | None:
    """None when authentication is off (no keys configured)."""
    inline = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    if not inline and settings.api_keys_file is None:
        return None
    return ApiKeys(inline, settings.api_keys_file)


def install_auth(app: FastAPI, keys: ApiKeys | None, settings: Settings) -> bool:
    """Add the middleware when keys are configured; returns whether it did."""
    if keys is None:
        return False
    paths = open_paths(settings)
    app.add_middleware(AuthMiddleware, keys=keys, open_paths=paths)
    log.info(
        "API-key authentication on", extra={"keys": len(keys.digests), "open_paths": sorted(paths)}
    )
    return True
