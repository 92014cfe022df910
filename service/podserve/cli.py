"""The `podserve` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    for flag, env in (
        ("host", "PODSERVE_HOST"),
        ("port", "PODSERVE_PORT"),
        ("workers", "PODSERVE_WORKERS"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    from podserve.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    if args.dev:
        import uvicorn

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

    try:
        names = build_demo_repository(Path(args.directory))
    except MissingBuildDependency as exc:  # the runtime image has no build tools: one line
        print(f"error: {exc}", file=sys.stderr)
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
