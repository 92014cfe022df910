"""The benchmark that proves the design: every system side by side, one run, one machine.

    .venv/bin/python -m loadtests.bench                 # full run (make bench)
    .venv/bin/python -m loadtests.bench --quick         # a smoke run in about a minute
    .venv/bin/python -m loadtests.bench --competitors   # + BentoML and MLServer (own venvs)

Systems (MiniLM, one sentence, then a 5 ms awaited I/O step): the article's three naive
FastAPI variants (loadtests/reference/), podserve (batching on), podserve with batching off
and with tracing on (every span exported to a local OTLP sink). Tabular: podserve against a
bare FastAPI constant endpoint (the HTTP ceiling); podserve fetching the row's features from
PostgreSQL (the real `features` phase). Ceiling: raw ONNX Runtime in-process, no HTTP.

Writes RESULTS/{results.json, results.md, *.png}; RESULTS defaults to
loadtests/results/bench-<UTC time>. Every run is bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from loadtests import bench_ceiling, bench_report
from loadtests.bench_measure import Point, Sample, describe, make_point, measure_once
from loadtests.bench_systems import (
    ROOT,
    SENTENCE,
    Server,
    System,
    entity_bodies,
    entity_body,
    exit_on_sigterm,
    free_port,
    gunicorn_argv,
    run_main,
    tabular_body,
    text_body,
)

PY = sys.executable
DEFAULT_MODEL = ROOT / "loadtests" / "models" / "minilm"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "podserve_bench"
PG_ENTITY = "patient-0042"


# --- model repositories -------------------------------------------------------------------
def build_repos(model_dir: Path, work: Path) -> dict[str, Path]:
    """minilm (batching on), minilm with batching off, tabular: each its own repository."""
    import yaml

    from podserve.demo_models import build_tabular

    repos = {name: work / name for name in ("minilm", "minilm_nobatch", "tabular")}
    for repo in repos.values():
        repo.mkdir(parents=True, exist_ok=True)
    (repos["minilm"] / "minilm").symlink_to(model_dir.resolve())
    nobatch = repos["minilm_nobatch"] / "minilm"
    nobatch.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.yaml":
            (nobatch / item.name).symlink_to(item.resolve())
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    config["batching"] = False
    (nobatch / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    build_tabular(repos["tabular"])
    return repos


# --- PostgreSQL for the real `features` phase ----------------------------------------------
def prepare_postgres(work: Path) -> str | None:
    """A database of its own (not the test suite's), migrated, with feature rows loaded."""
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", BENCH_DB)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"PostgreSQL unavailable, skipping the pg scenario: {exc!r}")
        return None
    dsn = f"postgresql://postgres@127.0.0.1:5432/{BENCH_DB}"
    csv_path = work / "features.csv"
    with csv_path.open("w") as handle:
        handle.write("entity_id," + ",".join(f"f{i}" for i in range(30)) + "\n")
        for i in range(1000):
            values = [round(v * (1 + (i % 7) / 100), 5) for v in _tabular_row()]
            handle.write(f"patient-{i:04d}," + ",".join(map(str, values)) + "\n")
    cli = [PY, "-m", "podserve.cli"]
    for args in (["db", "migrate"], ["features", "load", str(csv_path), "--set", "tabular"]):
        subprocess.run([*cli, *args, "--database-url", dsn], check=True, timeout=120, cwd=ROOT)
    return dsn


def _tabular_row() -> list[float]:
    from loadtests.bench_systems import TABULAR_ROW

    return TABULAR_ROW


# --- the systems -------------------------------------------------------------------------
def podserve_system(
    name: str, group: str, repo: Path, workers: int, path: str, body: bytes,
    extra: dict[str, str] | None = None, note: str = "", io_phase: str | None = "features",
) -> System:  # fmt: skip
    port = free_port()
    env = {
        "PODSERVE_HOST": "127.0.0.1",
        "PODSERVE_PORT": str(port),
        "PODSERVE_WORKERS": str(workers),
        "PODSERVE_MODEL_REPOSITORY": str(repo),
        "PODSERVE_LOG_LEVEL": "warning",
        "PODSERVE_TRACING_ENABLED": "false",
        "PODSERVE_GRACEFUL_TIMEOUT_S": "5",
        "PODSERVE_SPOOL_DIR": str(repo.parent / f"spool-{name}"),
        **(extra or {}),
    }
    return System(name, group, [PY, "-m", "podserve.cli", "serve"], env, path, body, note,
                  io_phase, port)  # fmt: skip


def reference_system(
    name: str, group: str, app: str, workers: int, path: str, body: bytes, env: dict[str, str],
    note: str, io_phase: str | None = "features",
) -> System:  # fmt: skip
    port = free_port()
    argv = gunicorn_argv(PY, app, workers, port)
    return System(name, group, argv, env, path, body, note, io_phase, port)


def catalogue(
    args: argparse.Namespace, repos: dict[str, Path], dsn: str | None, sink_port: int
) -> list[System]:
    n, io = args.workers, str(args.io_ms)
    text, tab = text_body(), tabular_body()
    minilm_path, tab_path = "/v2/models/minilm/infer", "/v2/models/tabular/infer"
    ref_env = {"REFERENCE_MODEL_DIR": str(args.model_dir.resolve()), "REFERENCE_IO_MS": io}
    sim = {"PODSERVE_SIMULATED_IO_MS": io}
    ref = "loadtests.reference."
    systems = [
        reference_system("inline", "minilm", ref + "inline_app:app", n, minilm_path, text,
                         ref_env, "model inline in async def"),
        reference_system("executor", "minilm", ref + "executor_app:app", n, minilm_path, text,
                         ref_env, "run_in_executor, 1-thread pool"),
        reference_system("process-pool", "minilm", ref + "process_app:app", n, minilm_path,
                         text, ref_env, "1-process ProcessPoolExecutor"),
        podserve_system("podserve", "minilm", repos["minilm"], n, minilm_path, text, sim,
                        "batching on (max 32 rows, 2 ms)"),
        podserve_system("podserve-nobatch", "minilm", repos["minilm_nobatch"], n, minilm_path,
                        text, sim, "batching off"),
        podserve_system("podserve-tracing", "minilm", repos["minilm"], n, minilm_path, text,
                        {**sim, "PODSERVE_TRACING_ENABLED": "true",
                         "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                         "OTEL_TRACES_SAMPLER": "always_on"},
                        "batching on, every request traced (OTLP to a local sink)"),
        podserve_system("podserve-tracing-10pct", "minilm", repos["minilm"], n, minilm_path,
                        text, {**sim, "PODSERVE_TRACING_ENABLED": "true",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                               "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                               "OTEL_TRACES_SAMPLER_ARG": "0.1"},
                        "batching on, 10% of requests traced"),
        reference_system("fastapi-constant", "tabular", ref + "constant_app:app", n, tab_path,
                         tab, {}, "bare FastAPI, constant answer", io_phase=None),
        podserve_system("podserve-tabular", "tabular", repos["tabular"], n, tab_path, tab,
                        {}, "tabular GBM, batching on", io_phase=None),
    ]  # fmt: skip
    if dsn is not None:
        pg = podserve_system("podserve-pg", "pg", repos["tabular"], n, tab_path,
                             entity_body(PG_ENTITY), {"PODSERVE_DATABASE_URL": dsn},
                             "each client's entity id -> features from PostgreSQL, "
                             "prediction log on")  # fmt: skip
        pg.bodies = entity_bodies()
        systems.append(pg)
    if args.competitors:
        from loadtests import competitors

        systems += competitors.systems(args, PY)
    wanted = set(args.systems.split(",")) if args.systems else None
    return [s for s in systems if wanted is None or s.name in wanted]


# --- the run -----------------------------------------------------------------------------
def machine() -> dict[str, str]:
    import onnxruntime

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu or platform.processor(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_gib:.0f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def run_ceiling(args: argparse.Namespace, repos: dict[str, Path], log: Callable) -> dict:
    log("ceiling: raw ONNX Runtime, in-process, no HTTP")
    minilm = bench_ceiling.sweep(
        args.model_dir / "1" / "model.onnx", args.ceiling_batches, args.workers,
        args.ceiling_s, text=SENTENCE,
    )  # fmt: skip
    for p in minilm:
        log(f"  minilm batch {p.batch:<3} {p.rows_per_s:8.1f} rows/s  run {p.infer_ms_p50:.2f} ms")
    tabular = bench_ceiling.sweep(
        repos["tabular"] / "tabular" / "1" / "model.onnx", [1, 64], args.workers, args.ceiling_s
    )
    for p in tabular:
        log(f"  tabular batch {p.batch:<3} {p.rows_per_s:9.0f} rows/s")
    return {"minilm": [asdict(p) for p in minilm], "tabular": [asdict(p) for p in tabular]}


def _concurrencies(system: System, args: argparse.Namespace) -> list[int]:
    if system.group == "tabular":  # a throughput comparison: c=1 says nothing there
        return [c for c in args.concurrency if c >= 8] or args.concurrency
    return args.concurrency


def run_rounds(
    systems: list[System], args: argparse.Namespace, repos: dict[str, Path], log_dir: Path,
    log: Callable,
) -> tuple[list[Point], dict]:  # fmt: skip
    """All servers up at once; each round measures the ceiling and then every system.

    Interleaving the repeats spreads whatever else runs on the machine evenly over the
    systems, so the ratios between them hold even when the background load changes.
    """
    samples: dict[tuple[str, int], list[Sample]] = {}
    ceilings: list[dict] = []
    with contextlib.ExitStack() as stack:
        servers = []
        for system in systems:
            try:
                servers.append(stack.enter_context(Server(system, log_dir)))
            except (RuntimeError, TimeoutError) as exc:
                log(f"FAILED to start {system.name}: {str(exc)[:2000]}")
        log_idle_cpu(servers, log)
        for round_no in range(1, args.repeats + 1):
            log(f"--- round {round_no} of {args.repeats}")
            ceilings.append(run_ceiling(args, repos, log))
            for server in servers:
                for c in _concurrencies(server.system, args):
                    sample = measure_once(server, c, args.duration, args.warmup)
                    samples.setdefault((server.system.name, c), []).append(sample)
                    log(describe(server.system.name, c, sample))
    points = [make_point(name, c, runs) for (name, c), runs in samples.items()]
    return points, median_ceiling(ceilings)


def log_idle_cpu(servers: list[Server], log: Callable, seconds: float = 3.0) -> None:
    """What the idle servers cost while another system is measured (they all stay up)."""
    before = [server.cpu_seconds() for server in servers]
    time.sleep(seconds)
    for server, cpu in zip(servers, before, strict=True):
        idle = 100 * (server.cpu_seconds() - cpu) / seconds
        log(f"  idle CPU {server.system.name:<20} {idle:5.1f}% of a core")


def median_ceiling(rounds: list[dict]) -> dict:
    """Per model and batch size: the median over rounds, with the range."""
    result: dict[str, list[dict]] = {}
    for model in rounds[0] if rounds else {}:
        by_batch: dict[int, list[dict]] = {}
        for ceiling in rounds:
            for point in ceiling[model]:
                by_batch.setdefault(point["batch"], []).append(point)
        result[model] = [
            {"batch": batch, "rows_per_s": statistics.median(p["rows_per_s"] for p in pts),
             "rows_per_s_min": min(p["rows_per_s"] for p in pts),
             "rows_per_s_max": max(p["rows_per_s"] for p in pts),
             "infer_ms_p50": statistics.median(p["infer_ms_p50"] for p in pts),
             "cpu_ms_per_row": statistics.median(p["cpu_ms_per_row"] for p in pts)}
            for batch, pts in sorted(by_batch.items())
        ]  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="podserve side-by-side benchmark")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    # Defaults of the options --quick shortens are filled in after parsing (None: not given),
    # so an option given explicitly wins even when it equals the normal default.
    normal = {"duration": 6.0, "warmup": 2.0, "repeats": 3, "ceiling_s": 4.0,
              "concurrency": "1,8,32,64", "ceiling_batches": "1,8,16,32,64"}  # fmt: skip
    quick = {"duration": 1.5, "warmup": 0.5, "repeats": 1, "ceiling_s": 1.0,
             "concurrency": "1,32", "ceiling_batches": "1,32"}  # fmt: skip

    def shortened(key: str) -> str:
        return f"default {normal[key]}, with --quick {quick[key]}"

    parser.add_argument("--concurrency", help=shortened("concurrency"))
    parser.add_argument("--duration", type=float, help="s per run: " + shortened("duration"))
    parser.add_argument("--warmup", type=float, help=shortened("warmup"))
    parser.add_argument("--repeats", type=int, help=shortened("repeats"))
    parser.add_argument("--io-ms", type=float, default=5.0)
    parser.add_argument("--ceiling-batches", help=shortened("ceiling_batches"))
    parser.add_argument("--ceiling-s", type=float, help=shortened("ceiling_s"))
    parser.add_argument("--systems", default="", help="comma-separated subset of system names")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL scenario")
    parser.add_argument("--competitors", action="store_true", help="+ BentoML, MLServer")
    parser.add_argument("--install-timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="short smoke run (shorter defaults)")
    parser.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="also write the results into this page (docs/performance.md)",
    )
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else normal).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.ceiling_batches = [int(b) for b in args.ceiling_batches.split(",")]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out = args.out or ROOT / "loadtests" / "results" / f"bench-{stamp}"
    return args


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    if not (args.model_dir / "1" / "model.onnx").exists():
        print(f"no model at {args.model_dir}: run `make bench-model` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    command = " ".join([".venv/bin/python -m loadtests.bench", *(argv or sys.argv[1:])])
    started = time.time()
    repos = build_repos(args.model_dir, work)
    dsn = None if args.no_pg else prepare_postgres(work)
    sink_port = free_port()
    sink = subprocess.Popen([PY, "-m", "loadtests.otlp_sink", str(sink_port)], cwd=ROOT)
    try:
        systems = catalogue(args, repos, dsn, sink_port)
        points, ceiling = run_rounds(systems, args, repos, work, log)
    finally:
        sink.terminate()
        sink.wait(10)
    doc = {
        "command": command,
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "ceiling": ceiling,
        "systems": [{"name": s.name, "group": s.group, "note": s.note} for s in systems],
        "points": [
            {
                "system": p.system,
                "concurrency": p.concurrency,
                "median": p.median,
                "phase_means": p.phase_means,
                "samples": [asdict(s) for s in p.samples],
            }
            for p in points
        ],
        "log": lines,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    markdown = bench_report.write(doc, args.out)
    if args.publish:
        bench_report.publish(args.out, args.publish)
    print(markdown)
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
