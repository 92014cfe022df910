"""A request's headers as a plain dict, built once per request from the raw ASGI list.

Starlette's `Headers.get` scans the raw list and encodes the name on every lookup: ~3.5 us
each on the dev machine, and an inference request reads about six of them (content type
and encoding, length, the binary-extension length, the deadline, the request id). The dict
is built in one pass (~2 us in all) and kept in the scope for the rest of the request.
"""

from __future__ import annotations

from starlette.types import Scope

HEADERS_SCOPE_KEY = "podserve.headers"


def request_headers(scope: Scope) -> dict[str, str]:
    """Lower-case names (ASGI servers lower-case them) -> latin-1 values."""
    headers: dict[str, str] | None = scope.get(HEADERS_SCOPE_KEY)
    if headers is None:
        # Reversed: a repeated header keeps its first value, as Starlette's Headers.get does.
        headers = scope[HEADERS_SCOPE_KEY] = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in reversed(scope["headers"])
        }
    return headers


def as_utf8(value: str | None) -> str | None:
    """A value read as latin-1 (the bytes, one by one) read again as UTF-8, as clients send
    text today (an X-Request-Id "réq-1", not "rÃ©q-1")."""
    return None if value is None else value.encode("latin-1").decode("utf-8", "replace")
