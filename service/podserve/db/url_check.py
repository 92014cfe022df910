"""A PostgreSQL URL that asyncpg could never connect with, found when the settings are read.

asyncpg parses the URL only at the first connection: a bad port was a traceback from deep in
asyncpg, at the server's start-up (after its models loaded) or from `podserve db`; a bad
`sslmode` an error on every connection attempt, which the server took for an outage.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("postgresql", "postgres")

# The query options asyncpg reads itself (connect_utils), and the values it accepts (libpq's
# spellings): any other is a ClientConfigurationError at every connection. Other options are
# sent to the server as settings, where PostgreSQL judges them.
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "MINIMUM_SUPPORTED", "MAXIMUM_SUPPORTED")
VERIFIED = ("require", "verify-ca", "verify-full")  # the sslmodes direct TLS takes
SESSION_ATTRIBUTES = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
OPTION_VALUES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": SESSION_ATTRIBUTES,
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": TLS_VERSIONS,
    "ssl_max_protocol_version": TLS_VERSIONS,
}


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
    return _option_problem(parts.query)


def _option_problem(query: str) -> str | None:
    """A query string asyncpg rejects, or an option value it does not know. The value is not
    repeated: a password's unescaped '?' puts the rest of it in the query."""
    try:
        # strict, as asyncpg parses it: "?sslmode" without a value is its ValueError
        options = parse_qs(query, strict_parsing=True) if query else {}
    except ValueError:
        return (
            "the database URL's query is not name=value pairs joined by '&' (percent-encode "
            "'@', ':', '/', '?' and '#' in the user name and password)"
        )
    for name, allowed in OPTION_VALUES.items():
        values = options.get(name)
        if values and _normalized(name, values[-1]) not in allowed:  # asyncpg takes the last
            return f"the database URL's {name} must be one of: {', '.join(allowed)}"
    # Without one in the URL, asyncpg takes PGSSLMODE, else prefer.
    default_mode = os.environ.get("PGSSLMODE") or "prefer"
    sslmode = _normalized("sslmode", options.get("sslmode", [default_mode])[-1])
    if options.get("sslnegotiation", [""])[-1] == "direct" and sslmode not in VERIFIED:
        return "the database URL's sslnegotiation=direct needs sslmode=require or verify-*"
    return None


def _normalized(name: str, value: str) -> str:
    """asyncpg also takes verify_full (sslmode) and TLSv1_2 (an attribute's name, not libpq's)."""
    if name == "sslmode":
        return value.replace("_", "-")
    if OPTION_VALUES[name] is TLS_VERSIONS:
        return value.replace("_", ".") if value.startswith("TLS") else value
    return value


def _ports(netloc: str, query: str) -> list[str]:
    """Every port given: in host:port lists (h1:5432,h2:5433; [::1]:5432) and ?port=..."""
    hosts = netloc.rpartition("@")[2]
    ports = [spec.rpartition("]")[2].partition(":")[2] for spec in hosts.split(",")]
    for value in parse_qs(query).get("port", []):
        ports += value.split(",")
    return [port for port in ports if port]
