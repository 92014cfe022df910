"""The `podserve` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    flags: dict[str, str] = {}  # PODSERVE_WORKERS: --workers, for the flags given
    for flag, env in (
        ("host", "PODSERVE_HOST"),
        ("port", "PODSERVE_PORT"),
        ("workers", "PODSERVE_WORKERS"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
            flags[env] = f"--{flag}"
    from pydantic import ValidationError

    from podserve.settings import get_settings, settings_errors

    get_settings.cache_clear()
    try:
        settings = get_settings()
    except ValidationError as exc:  # a flag's value: named as the flag, and its setting
        for line in settings_errors(exc):
            print(f"error: {_with_flag(line, flags)}", file=sys.stderr)
        return 2
    if args.dev:
        import uvicorn

        from podserve.logs import configure_logging

        # The reloader's process logs the address ("Uvicorn running on ..."): in the JSON
        # lines the server's own process writes, not dropped for want of a handler.
        configure_logging(settings.log_level, settings.access_log)
        # "N changes detected" at info for every file written under the folder (a log, an
        # editor's swap file), whether or not it reloads: uvicorn logs the reloads it does.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        uvicorn.run(
            "podserve.app:create_app",
            factory=True,
            reload=True,
            host=settings.host,
            port=settings.port,
            log_config=None,
            server_header=False,
        )
        return 0
    _gunicorn_application().run()
    return 0


def _with_flag(line: str, flags: dict[str, str]) -> str:
    """`PODSERVE_WORKERS='0': ...` as `--workers (PODSERVE_WORKERS)='0': ...` when the value
    came from the flag: the user typed --workers, not the variable."""
    for env, flag in flags.items():
        if line.startswith((f"{env}=", f"{env}:")):
            return f"{flag} ({env}){line[len(env) :]}"
    return line


def _gunicorn_application() -> Any:
    from gunicorn.app.base import BaseApplication

    from podserve.gunicorn_conf import config_dict
    from podserve.settings import get_settings

    class PodserveApplication(BaseApplication):
        def load_config(self) -> None:
            for key, value in config_dict(get_settings()).items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from podserve.app import create_app

            return create_app()

    return PodserveApplication()


def _build_demo(args: argparse.Namespace) -> int:
    from podserve.demo_models import MissingBuildDependency, build_demo_repository

    directory = Path(args.directory)
    if directory.exists() and not directory.is_dir():
        print(f"error: {directory} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        names = build_demo_repository(directory)
    except MissingBuildDependency as exc:  # the runtime image has no build tools: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file in the way, no permission: one line, not a traceback
        print(f"error: cannot write the demo models to {directory}: {exc}", file=sys.stderr)
        return 2
    print(f"demo models written to {args.directory}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model repository over HTTP")
    serve.add_argument("--dev", action="store_true", help="single uvicorn process with reload")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(func=_serve)

    models = commands.add_parser("models", help="model repository tools")
    models_cmds = models.add_subparsers(dest="models_command", required=True)
    demo = models_cmds.add_parser("build-demo", help="write the demo model repository")
    demo.add_argument("directory")
    demo.set_defaults(func=_build_demo)

    from podserve.db import cli as db_cli

    db_cli.register(commands)  # `podserve db ...`, `podserve features ...`
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from podserve.settings import report_invalid

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:  # PODSERVE_* settings: one line each, not a traceback
        return report_invalid(exc)


if __name__ == "__main__":
    sys.exit(main())
