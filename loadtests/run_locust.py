"""`make loadtest`: start a local podserve, run Locust headless for a bounded time, summarise.

    .venv/bin/python -m loadtests.run_locust --users 16 --run-time 30s
    .venv/bin/python -m loadtests.run_locust --host http://127.0.0.1:8000   # existing server

Builds the demo models (and adds MiniLM when `make bench-model` has built it), prepares a
PostgreSQL database of its own for the entity-id and job scenarios (left out, with a note,
when PostgreSQL is not reachable), writes Locust's CSV and HTML reports under
loadtests/results/locust-<UTC time>/, then prints RPS, p50/p95/p99 and failures per request
plus the server's per-phase breakdown read from `Server-Timing`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from loadtests.bench_systems import (
    ROOT,
    Server,
    System,
    exit_on_sigterm,
    free_port,
    run_main,
    tabular_body,
)

MINILM = ROOT / "loadtests" / "models" / "minilm"


def build_repository(work: Path) -> tuple[Path, str]:
    """Demo models (+ MiniLM when built); returns the repository and the text model's name."""
    from podserve.demo_models import build_demo_repository

    repo = work / "models"
    build_demo_repository(repo)
    if (MINILM / "1" / "model.onnx").exists():
        (repo / "minilm").symlink_to(MINILM.resolve())
        return repo, "minilm"
    return repo, "text"


def start_server(work: Path, workers: int, dsn: str | None) -> tuple[Server, str]:
    repo, text_model = build_repository(work)
    port = free_port()
    env = {
        "PODSERVE_HOST": "127.0.0.1",
        "PODSERVE_PORT": str(port),
        "PODSERVE_WORKERS": str(workers),
        "PODSERVE_MODEL_REPOSITORY": str(repo),
        "PODSERVE_LOG_LEVEL": "warning",
        "PODSERVE_TRACING_ENABLED": "false",
        "PODSERVE_SPOOL_DIR": str(work / "spool"),
        "PODSERVE_JOBS_POLL_MS": "50",
    }
    if dsn:
        env["PODSERVE_DATABASE_URL"] = dsn
    system = System("podserve", "locust", [sys.executable, "-m", "podserve.cli", "serve"], env,
                    "/v2/models/tabular/infer", tabular_body(), port=port)  # fmt: skip
    return Server(system, work).start(), text_model


def run_locust(args: argparse.Namespace, host: str, out: Path, env: dict[str, str]) -> int:
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "--host", host, "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
        "--stop-timeout", "5", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    limit = run_time_s(args.run_time) + 60  # Locust stops itself; this is the backstop
    done = subprocess.run(cmd, env={**os.environ, **env}, timeout=limit, check=False)
    return done.returncode


_TIMESPAN = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def run_time_s(run_time: str) -> int:
    """Seconds of a Locust --run-time (20, 30s, 1m30s, 2h): Locust's syntax. (Its own
    parser sits in the `locust` package, whose import would monkey-patch this process.)"""
    text = run_time.strip().lower()
    if text.isdigit():
        return int(text)
    match = _TIMESPAN.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"invalid run time {run_time!r}: use e.g. 30s, 2m, 1m30s, 1h")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _run_time(value: str) -> str:
    """argparse check: a bad --run-time fails before any server starts."""
    try:
        run_time_s(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def summary(out: Path) -> str:
    """The request table and the server's phases, from the locustfile's end-of-run file."""
    doc = json.loads((out / "phases.json").read_text())
    lines = ["| request | count | failures | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in doc["requests"]:
        lines.append(f"| {row['name']} | {row['count']} | {row['failures']} | {row['rps']:.1f} "
                     f"| {row['p50']:.0f} | {row['p95']:.0f} | {row['p99']:.0f} |")  # fmt: skip
    lines += [
        "",
        "Server-side phases (from Server-Timing), ms:",
        "",
        "| request | phase | count | p50 | p95 | p99 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in doc["phases"]:
        lines.append(f"| {row['name']} | {row['phase']} | {row['count']} | "
                     f"{row['p50']:.3f} | {row['p95']:.3f} | {row['p99']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="headless Locust against a local podserve")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=16)
    parser.add_argument("--run-time", type=_run_time, default="30s",
                        help="e.g. 30s, 2m, 1m30s (bounded)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--host", default="", help="an existing server (loopback); else start one")
    parser.add_argument("--weights", default="", help="LOCUST_WEIGHTS, e.g. tabular=4,text=2")
    parser.add_argument("--no-pg", action="store_true", help="no PostgreSQL: no entity/jobs")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "loadtests" / "results" / f"locust-{stamp}"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    dsn = None
    if not args.no_pg and not args.host:
        from loadtests.bench import prepare_postgres

        dsn = prepare_postgres(work)
    with_db = "tabular=4,v1=1,text=2,entity=1,jobs=1"  # the database scenarios too
    weights = args.weights or (with_db if dsn else "")
    server = None
    host, text_model = args.host, os.environ.get("LOCUST_TEXT_MODEL", "text")
    try:
        if not host:
            server, text_model = start_server(work, args.workers, dsn)
            host = f"http://127.0.0.1:{server.system.port}"
        (out / "phases.json").unlink(missing_ok=True)  # a reused --out: no stale summary
        env = {"LOCUST_PHASES_FILE": str(out / "phases.json"), "LOCUST_WEIGHTS": weights,
               "LOCUST_TEXT_MODEL": text_model}  # fmt: skip
        code = run_locust(args, host, out, env)
    finally:
        if server is not None:
            server.stop()
    if not (out / "phases.json").exists():  # Locust failed before running (its error above)
        print(f"Locust exited with code {code} before writing a summary", file=sys.stderr)
        return code or 1
    print(summary(out))
    print(f"\nreports: {out}/report.html, {out}/locust_stats.csv")
    return code


if __name__ == "__main__":
    run_main(main)
