"""A PostgreSQL URL that asyncpg could never connect with, found when the settings are read.

asyncpg parses the URL only at the first connection: a bad port was a traceback from deep in
asyncpg, at the server's start-up (after its models loaded) or from `podserve db`.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

SCHEMES = ("postgresql", "postgres")


def url_problem(url: str) -> str | None:
    """What is wrong with a postgresql:// URL, or None. Never repeats the URL (its password)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        return "the database URL must start with postgresql:// or postgres://"
    for port in _ports(parts.netloc, parts.query):
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            # Not the text itself: a password with an unescaped '#', '/' or '?' ends the
            # host part early, and its end would be read, and printed, as the port.
            return (
                "the database URL's port is not a number from 1 to 65535 (percent-encode "
                "'@', ':', '/', '?' and '#' in the user name and password)"
            )
    return None


def _ports(netloc: str, query: str) -> list[str]:
    """Every port given: in host:port lists (h1:5432,h2:5433; [::1]:5432) and ?port=..."""
    hosts = netloc.rpartition("@")[2]
    ports = [spec.rpartition("]")[2].partition(":")[2] for spec in hosts.split(",")]
    for value in parse_qs(query).get("port", []):
        ports += value.split(",")
    return [port for port in ports if port]
