"""`podserve db migrate|status` and `podserve features load` (registered by podserve.cli)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any


def register(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="PostgreSQL schema")
    db_cmds = db.add_subparsers(dest="db_command", required=True)
    migrate = db_cmds.add_parser(
        "migrate", help="apply the packaged SQL migrations (idempotent, advisory-locked)"
    )
    _url_argument(migrate)
    migrate.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying to connect this long (a database still starting)",
    )
    migrate.set_defaults(func=_migrate)
    status = db_cmds.add_parser("status", help="applied vs packaged schema version")
    _url_argument(status)
    status.set_defaults(func=_status)

    features = commands.add_parser("features", help="feature store tools")
    feature_cmds = features.add_subparsers(dest="features_command", required=True)
    load = feature_cmds.add_parser("load", help="bulk-load a .csv or .parquet file with COPY")
    load.add_argument("file", type=Path)
    load.add_argument("--set", dest="feature_set", required=True, help="feature set name")
    load.add_argument("--id-column", help="entity id column (default: entity_id, else first)")
    load.add_argument("--replace", action="store_true", help="drop the set's other rows")
    load.add_argument("--batch-rows", type=int, default=50_000)
    _url_argument(load)
    load.set_defaults(func=_load)


def _url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="default: PODSERVE_DATABASE_URL")


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        from podserve.db.url_check import url_problem

        problem = url_problem(args.database_url)
        if problem:
            print(f"error: --database-url: {problem}", file=sys.stderr)
            raise SystemExit(2)
        return args.database_url
    from podserve.settings import get_settings

    url = get_settings().database_url
    if url is None:
        print("error: set PODSERVE_DATABASE_URL or pass --database-url", file=sys.stderr)
        raise SystemExit(2)
    return url.get_secret_value()


def _run(coro: Any) -> Any:
    """asyncio.run, with database failures as one line on stderr (exit 1), not a traceback."""
    import asyncpg

    from podserve.db.features import SCHEMA_MISSING
    from podserve.db.migrations import MigrationError

    try:
        return asyncio.run(coro)
    except asyncpg.UndefinedTableError as exc:  # a database never migrated: say what to do
        print(f"error: {SCHEMA_MISSING} ({exc})", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, MigrationError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _migrate(args: argparse.Namespace) -> int:
    from podserve.db.migrations import migrate_url
    from podserve.settings import get_settings

    bound_s = get_settings().db_idle_in_transaction_timeout_s
    applied = _run(migrate_url(_database_url(args), wait_s=args.wait, orphan_timeout_s=bound_s))
    print(f"migrations applied: {applied}" if applied else "schema up to date")
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncpg

    from podserve.db.migrations import schema_status

    async def run() -> tuple[int, int]:
        conn = await asyncpg.connect(_database_url(args), timeout=10)
        try:
            return await schema_status(conn)
        finally:
            await conn.close()

    applied, latest = _run(run())
    if applied < latest:
        hint = ": behind, run `podserve db migrate`"
    elif applied > latest:
        hint = ": ahead, migrated by a newer podserve than this one"
    else:
        hint = ""
    print(f"schema version {applied}, packaged {latest}{hint}")
    return 0 if applied == latest else 1


def _load(args: argparse.Namespace) -> int:
    import asyncpg

    from podserve.db.loader import FeatureFileError, load_features, open_feature_file

    async def run() -> int:
        file = open_feature_file(args.file, args.id_column, args.batch_rows)
        conn = await asyncpg.connect(_database_url(args), timeout=10)
        try:
            return await load_features(conn, args.feature_set, file, replace=args.replace)
        finally:
            await conn.close()

    started = time.perf_counter()
    try:
        loaded = _run(run())
    except FeatureFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repeated = loaded.rows_read - loaded.entities_stored
    print(
        f"loaded {loaded.rows_read} rows into feature set '{args.feature_set}' "
        f"in {time.perf_counter() - started:.2f} s"
        + (f": {loaded.entities_stored} entities ({repeated} rows repeated an id; the last "
           "row of an id is kept)" if repeated else "")
    )  # fmt: skip
    return 0
