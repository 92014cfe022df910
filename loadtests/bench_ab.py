"""A/B: podserve under the same load with different settings, rounds interleaved.

Every variant is a podserve server (Gunicorn, `--workers`, the MiniLM model behind the 5 ms
awaited I/O step with batching on or off, the tabular model, or the tabular model fed by
the real `features` lookup in PostgreSQL with the prediction log on: `--model pg`, the
benchmark's own database, see loadtests.bench.prepare_postgres) started once with its own
`PODSERVE_*` overrides; the rounds alternate between them, each after its own warm-up, so
drift on a shared machine hits all variants alike. Per round and as medians it prints
req/s, client p50/p99, the I/O phase p50/p99, server CPU per request and the event loops'
share of it. The load generator and the measurement are loadtests.bench's own
(bench_measure.measure_once).

    .venv/bin/python -m loadtests.bench_ab --model minilm --concurrency 32 --rounds 4 \\
        --variant base: --variant yield:PODSERVE_SOME_KNOB=1

Mixed lengths: `--long-every 8` (MiniLM) has one client in 8 send a 256-token text, the
others the short sentence: requests are batched by length, so a short one no longer pays
for a long batch-mate's padding (the old code's req/s were 13x lower). To compare with an older
checkout, a variant can run its code: `--variant old:PYTHONPATH=/path/to/old/service`.

Overload: `--concurrency 1024` (more clients than the queues hold) shows what clients that
retry a 503 at once do to goodput; add `--honor-retry-after` for clients that wait as told.
The `fail` column counts the 503s.

Medians alone mislead on a noisy machine (a few ms of one p99 move between rounds), so each
variant is also compared with the first one round by round: in how many rounds it was
better, the two-sided sign-test p-value of that count, and the median of the per-round
ratios. "better in 6 of 6 rounds, p 0.03" is a finding; "4 of 6, p 0.69" is noise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from loadtests.bench import DEFAULT_MODEL, PG_ENTITY, build_repos, podserve_system, prepare_postgres
from loadtests.bench_measure import Sample, measure_once
from loadtests.bench_systems import (
    Server,
    entity_bodies,
    entity_body,
    exit_on_sigterm,
    run_main,
    tabular_body,
    text_body,
)

COLUMNS = (
    ("req/s", "throughput", "8.1f"),
    ("p50", "p50", "6.1f"),
    ("p99", "p99", "6.1f"),
    ("io p50", "io_p50", "6.2f"),
    ("io p99", "io_p99", "6.2f"),
    ("cpu ms/req", "cpu_ms_per_request", "6.3f"),
    ("loop ms/req", "loop_cpu_ms_per_request", "6.3f"),
    ("rows/run", "rows_per_batch", "5.1f"),
    ("fail", "failures", "4.0f"),
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:KEY=VALUE,KEY=VALUE` (an empty list after the colon is the baseline)."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


# Paired comparisons: (label, Sample field, True when higher is better).
PAIRED = (
    ("req/s", "throughput", True),
    ("p99", "p99", False),
    ("io p99", "io_p99", False),
    ("cpu ms/req", "cpu_ms_per_request", False),
)


def sign_test_p(wins: int, rounds: int) -> float:
    """Two-sided sign test: how likely `wins` or a count as far from rounds/2 is by chance."""
    if rounds == 0:
        return 1.0
    extreme = min(wins, rounds - wins)
    tail = sum(math.comb(rounds, k) for k in range(extreme + 1)) / 2**rounds
    return min(1.0, 2 * tail)


def paired_summary(base: Sequence[Sample], other: Sequence[Sample]) -> str:
    """`other` against `base`, round by round (round i of one with round i of the other)."""
    cells = []
    for label, key, higher_is_better in PAIRED:
        pairs = [
            (getattr(b, key), getattr(o, key))
            for b, o in zip(base, other, strict=True)
            if getattr(b, key) is not None and getattr(o, key) is not None and getattr(b, key) > 0
        ]
        if not pairs:
            continue
        wins = sum((o > b) if higher_is_better else (o < b) for b, o in pairs)
        ratio = statistics.median(o / b for b, o in pairs)
        p = sign_test_p(wins, len(pairs))
        cells.append(f"{label} x{ratio:.3f}, better in {wins}/{len(pairs)} (p {p:.2f})")
    return "; ".join(cells)


def _row(name: str, sample: Sample) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        value = getattr(sample, key)
        cells.append(format(value, fmt) if value is not None else "-")
    return f"{name:<14} " + " ".join(f"{c:>10}" for c in cells)


LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # 256+ tokens


def mixed_text_bodies(long_every: int) -> list[bytes]:
    """Per client (mod their count): the long text first, then `long_every - 1` short ones."""
    return [text_body(LONG_TEXT)] + [text_body()] * (long_every - 1)


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, type=parse_variant)
    # minilm_nobatch: batching off in config; pg: tabular fed from PostgreSQL (`features`)
    models = ["minilm", "minilm_nobatch", "tabular", "pg"]
    parser.add_argument("--model", choices=models, default="minilm")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--io-ms", type=float, default=5.0)
    parser.add_argument(
        "--long-every",
        type=int,
        default=0,
        help="MiniLM: one client in N sends a 256-token text, the others the short sentence",
    )
    parser.add_argument(
        "--honor-retry-after",
        action="store_true",
        help="clients answered 503 wait Retry-After before their next request (default: at once)",
    )
    args = parser.parse_args()

    header = f"{'variant':<14} " + " ".join(f"{label:>10}" for label, _, _ in COLUMNS)
    samples: dict[str, list[Sample]] = {name: [] for name, _ in args.variant}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        minilm = args.model.startswith("minilm")
        repos = build_repos(args.model_dir, Path(tmp)) if minilm else None
        pg_env: dict[str, str] = {}
        if repos is None:
            from podserve.demo_models import build_tabular

            repo = Path(tmp, "tabular")
            repo.mkdir()
            build_tabular(repo)
        if args.model == "pg":
            dsn = prepare_postgres(Path(tmp))
            if dsn is None:
                return 1
            pg_env = {"PODSERVE_DATABASE_URL": dsn}
        servers = {}
        for name, env in args.variant:
            if repos is not None:  # MiniLM, batching on or off: the repository's config says
                system = podserve_system(
                    name, "ab", repos[args.model], args.workers, "/v2/models/minilm/infer",
                    text_body(), {"PODSERVE_SIMULATED_IO_MS": str(args.io_ms), **env},
                )  # fmt: skip
                if args.long_every > 0:
                    system.bodies = mixed_text_bodies(args.long_every)
            elif pg_env:
                system = podserve_system(
                    name, "ab", repo, args.workers, "/v2/models/tabular/infer",
                    entity_body(PG_ENTITY), {**pg_env, **env},
                )  # fmt: skip
                system.bodies = entity_bodies()  # each client its own entity
            else:
                system = podserve_system(
                    name, "ab", repo, args.workers, "/v2/models/tabular/infer",
                    tabular_body(), env, io_phase=None,
                )  # fmt: skip
            servers[name] = stack.enter_context(Server(system, Path(tmp)))
        print(header, flush=True)
        for round_no in range(args.rounds):
            order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
            for name in order:
                sample = measure_once(
                    servers[name], args.concurrency, args.duration, args.warmup,
                    args.honor_retry_after,
                )  # fmt: skip
                samples[name].append(sample)
                print(_row(name, sample), flush=True)
    print("\nmedians over the rounds")
    print(header)
    for name, runs in samples.items():
        median = Sample(**{
            key: statistics.median(getattr(s, key) for s in runs)
            if all(getattr(s, key) is not None for s in runs) else None
            for key in Sample.__dataclass_fields__
            if key not in ("phase_means", "statuses")
        }, phase_means={}, statuses={})  # fmt: skip
        print(_row(name, median))
    names = list(samples)
    if len(names) > 1:
        print(f"\nround by round against {names[0]} (median ratio; rounds better; sign test)")
        for name in names[1:]:
            print(f"{name:<14} {paired_summary(samples[names[0]], samples[name])}")
    return 0


if __name__ == "__main__":
    run_main(main)
