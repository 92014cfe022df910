"""A database the server can never use stops its start in one line; an outage does not.

asyncpg rejects a bad client-side option (sslmode=bogus) at every connection attempt with a
ClientConfigurationError, an InterfaceError: the server took it for an outage, got ready,
and logged "cannot claim jobs" on every poll, for ever.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

import postgres
from podserve.db.url_check import url_problem
from server_process import PODSERVE, serve_to_exit

BASE = "postgresql://podserve:s3cret@127.0.0.1:5432/test"
NO_SUCH_DB = "podserve_no_such_db"


def _failure(output: str) -> dict:
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    (failure,) = [line for line in lines if line["msg"] == "start-up failed"]
    return failure


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("sslmode=bogus", "sslmode"),
        ("sslmode=require&sslmode=Require", "sslmode"),  # asyncpg takes the last
        ("sslnegotiation=tls", "sslnegotiation"),
        ("target_session_attrs=master", "target_session_attrs"),
        ("gsslib=kerberos", "gsslib"),
        ("ssl_min_protocol_version=SSLv3", "ssl_min_protocol_version"),
        ("ssl_max_protocol_version=TLSv2", "ssl_max_protocol_version"),
        ("sslmode=prefer&sslnegotiation=direct", "sslnegotiation=direct"),
        ("sslnegotiation=direct", "sslnegotiation=direct"),  # asyncpg's default is prefer
    ],
)
def test_an_option_value_asyncpg_rejects_is_a_url_problem(query: str, option: str) -> None:
    problem = url_problem(f"{BASE}?{query}")
    assert problem is not None and problem.startswith(f"the database URL's {option} ")


def test_a_query_asyncpg_cannot_parse_is_a_url_problem() -> None:
    problem = url_problem(f"{BASE}?sslmode")  # asyncpg's strict parse: a bare ValueError
    assert problem is not None and "name=value pairs" in problem


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "sslmode=verify_ca",  # asyncpg's own spelling
        "sslmode=disable&sslnegotiation=postgres&target_session_attrs=read-write",
        "sslmode=verify-full&sslnegotiation=direct",
        "ssl_min_protocol_version=TLSv1.2&ssl_max_protocol_version=TLSv1_3&gsslib=gssapi",
        "application_name=x&foo=bar",  # server settings: PostgreSQL judges those
        "ssl_min_protocol_version=MINIMUM_SUPPORTED&ssl_max_protocol_version=MAXIMUM_SUPPORTED",
    ],
)
def test_options_asyncpg_takes_pass_the_check(query: str) -> None:
    assert url_problem(f"{BASE}?{query}") is None


def test_a_bad_sslmode_stops_the_start_naming_it() -> None:
    """Before: ready, "database unreachable at start-up; connecting on demand"."""
    env = {**os.environ, "PODSERVE_DATABASE_URL": f"{BASE}?sslmode=bogus"}
    out = subprocess.run(
        [*PODSERVE, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "PODSERVE_DATABASE_URL: Value error, the database URL's sslmode must be" in out.stderr
    assert "s3cret" not in out.stderr


def test_a_client_configuration_error_is_no_outage(
    db_url: str, db_models: Path, tmp_path: Path
) -> None:
    """One the URL check cannot see (from libpq's environment): it fails the start too."""
    env = postgres.server_env(db_url, tmp_path / "spool", PGTARGETSESSIONATTRS="master")
    status, output = serve_to_exit(db_models, env, timeout=30)
    assert status == 3 and "Traceback" not in output, output
    failure = _failure(output)
    assert failure["error"].startswith(
        "PODSERVE_DATABASE_URL or a PG* environment variable: "
        "target_session_attrs is expected to be one of"
    )
    assert failure["error_type"] == "ClientConfigurationError"
    assert "unreachable" not in output


def test_a_database_that_does_not_exist_is_one_line(
    pg_server: postgres.PostgresServer, db_models: Path, tmp_path: Path
) -> None:
    url = postgres.with_database(pg_server.admin_url, NO_SUCH_DB)
    status, output = serve_to_exit(db_models, postgres.server_env(url, tmp_path / "spool"))
    assert status == 3 and "Traceback" not in output, output
    failure = _failure(output)
    assert failure["error"] == f'PODSERVE_DATABASE_URL: database "{NO_SUCH_DB}" does not exist'


def test_a_spool_dir_that_is_a_file_is_one_line(
    db_url: str, db_models: Path, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.write_text("")
    status, output = serve_to_exit(db_models, postgres.server_env(db_url, spool))
    assert status == 3 and "Traceback" not in output, output
    error = _failure(output)["error"]
    assert error.startswith("PODSERVE_SPOOL_DIR: ") and str(spool) in error
