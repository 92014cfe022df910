"""What tracing and metrics cost: the same server with them off and on, side by side, one run.

    .venv/bin/python -m loadtests.bench_tracing                 # ~3 minutes
    .venv/bin/python -m loadtests.bench_tracing --duration 2 --rounds 2 --models tabular

Six servers (1 Gunicorn worker each, 1 inference thread) start together on 127.0.0.1:
`off` (no metrics, no tracing), `metrics`, `tracing` (every request traced), `both`,
`both-0%` (tracing on, nothing sampled: what every request pays) and `both-10%`
(parent-based 10 % sampling, a production setting). Spans go over OTLP/HTTP to
a sink in its own process (loadtests/otlp_sink.py), so exporting is paid by the server as in
production but receiving is not. The load is closed-loop on keep-alive connections
(loadtests/loadgen.py). Rounds interleave the servers in a shuffled order so that drift of the
machine hits all of them alike; each figure is the median over rounds, and ratios are to
`off` measured in the same rounds. Server CPU per request is read from /proc (psutil): on a
shared 2-core machine it is a steadier measure of cost than throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

from loadtests.bench_systems import exit_on_sigterm, run_main
from loadtests.loadgen import closed_loop, encode_request, percentile

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
TABULAR_ROW = [0.5] * 30
CONFIGS: dict[str, dict[str, str]] = {
    "off": {"PODSERVE_METRICS_ENABLED": "false", "PODSERVE_TRACING_ENABLED": "false"},
    "metrics": {"PODSERVE_METRICS_ENABLED": "true", "PODSERVE_TRACING_ENABLED": "false"},
    "tracing": {"PODSERVE_METRICS_ENABLED": "false", "PODSERVE_TRACING_ENABLED": "true",
                "OTEL_TRACES_SAMPLER": "always_on"},
    "both": {"PODSERVE_METRICS_ENABLED": "true", "PODSERVE_TRACING_ENABLED": "true",
             "OTEL_TRACES_SAMPLER": "always_on"},
    "both-0%": {  # tracing machinery on, nothing sampled: the cost every request pays
        "PODSERVE_METRICS_ENABLED": "true",
        "PODSERVE_TRACING_ENABLED": "true",
        "OTEL_TRACES_SAMPLER": "always_off",
    },
    "both-10%": {"PODSERVE_METRICS_ENABLED": "true", "PODSERVE_TRACING_ENABLED": "true",
                 "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                 "OTEL_TRACES_SAMPLER_ARG": "0.1"},
}  # fmt: skip
BODIES = {
    "tabular": orjson.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32",
                                         "data": TABULAR_ROW}]}),
    "text": orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                      "data": ["The quick brown fox jumps over the lazy dog."]}]}),
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, repo: Path, sink_port: int, log_dir: Path) -> None:
        env = {
            **os.environ,
            "PODSERVE_HOST": "127.0.0.1",
            "PODSERVE_PORT": str(self.port),
            "PODSERVE_WORKERS": "1",
            "PODSERVE_POOL_THREADS": "1",
            "PODSERVE_ORT_INTRA_OP_THREADS": "1",
            "PODSERVE_MODEL_REPOSITORY": str(repo),
            "PODSERVE_LOG_LEVEL": "warning",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_SERVICE_NAME": f"bench-{self.name}",
            **self.env,
        }
        log = (log_dir / f"{self.name}.log").open("wb")
        self.proc = subprocess.Popen([PY, "-m", "podserve.cli", "serve"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready")

    def cpu_s(self) -> float:
        """CPU seconds of the master and its workers so far."""
        assert self.proc is not None
        master = psutil.Process(self.proc.pid)
        total = 0.0
        for proc in [master, *master.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    client_cpu_share: float


def measure(server: Server, body: bytes, path: str, concurrency: int, seconds: float) -> Sample:
    request = encode_request("POST", "127.0.0.1", server.port, path, body, "application/json")
    cpu_before = server.cpu_s()
    result = asyncio.run(closed_loop("127.0.0.1", server.port, request, concurrency, seconds))
    cpu = server.cpu_s() - cpu_before
    if result.failures:
        raise RuntimeError(f"{server.name}: {result.failures} failures {result.statuses}")
    return Sample(
        rps=result.throughput,
        p50_ms=percentile(result.latencies, 0.5) * 1000,
        p99_ms=percentile(result.latencies, 0.99) * 1000,
        cpu_us_per_req=cpu / max(1, result.ok) * 1e6,
        client_cpu_share=result.client_cpu_s / result.elapsed_s,
    )


def run(args: argparse.Namespace) -> dict[str, dict[str, list[Sample]]]:
    from podserve.demo_models import build_demo_repository

    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    repo = work / "models"
    build_demo_repository(repo)
    sink_port = free_port()
    sink = subprocess.Popen([PY, "-m", "loadtests.otlp_sink", str(sink_port)], cwd=ROOT)
    servers = [Server(name, env) for name, env in CONFIGS.items() if name in args.configs]
    samples: dict[str, dict[str, list[Sample]]] = {m: {s.name: [] for s in servers}
                                                   for m in args.models}  # fmt: skip
    try:
        for server in servers:
            server.start(repo, sink_port, work)
        for server in servers:
            server.wait_ready()
        for model in args.models:
            path = f"/v2/models/{model}/infer"
            for server in servers:  # warm up: first requests, lazy imports, JIT caches
                measure(server, BODIES[model], path, args.concurrency, 1.0)
            for round_no in range(args.rounds):
                order = random.Random(round_no).sample(servers, len(servers))
                for server in order:
                    sample = measure(server, BODIES[model], path, args.concurrency, args.duration)
                    samples[model][server.name].append(sample)
                    print(f"  {model:8} round {round_no + 1} {server.name:9} "
                          f"{sample.rps:7.0f} rps  {sample.cpu_us_per_req:6.0f} us CPU/req",
                          flush=True)  # fmt: skip
    finally:
        for server in servers:
            server.stop()
        sink.terminate()
        sink.wait(10)
    return samples


def report(samples: dict[str, dict[str, list[Sample]]]) -> str:
    lines = []
    for model, by_server in samples.items():
        base = by_server["off"]
        base_rps = statistics.median(s.rps for s in base)
        base_cpu = statistics.median(s.cpu_us_per_req for s in base)
        lines += [
            f"\n{model}: median of {len(base)} rounds",
            "| config | rps | rps / off | server CPU us/req | CPU / off | p50 ms | p99 ms "
            "| client CPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, runs in by_server.items():
            rps = statistics.median(s.rps for s in runs)
            cpu = statistics.median(s.cpu_us_per_req for s in runs)
            lines.append(
                f"| {name} | {rps:.0f} | {rps / base_rps:.3f} | {cpu:.0f} | {cpu / base_cpu:.3f} "
                f"| {statistics.median(s.p50_ms for s in runs):.2f} "
                f"| {statistics.median(s.p99_ms for s in runs):.2f} "
                f"| {statistics.median(s.client_cpu_share for s in runs):.0%} |"
            )
    return "\n".join(lines)


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["tabular", "text"], choices=BODIES)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    if "off" not in args.configs:
        parser.error("the 'off' configuration is the baseline: keep it")
    print(report(run(args)))


if __name__ == "__main__":
    run_main(main)
