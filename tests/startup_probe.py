"""New connections while a replacement worker loads its models, with and without deferred listen.

`python tests/startup_probe.py [--trials N] [--models M] [--seconds S]`: per trial, a 2-worker
podserve on a repository of M slow-to-load models; one worker gets SIGTERM, and for S seconds
a client opens a new connection per request (one after another) while Gunicorn forks and the
replacement loads. Both modes run interleaved in one go (the machine is shared); prints JSON:
per mode, the slowest request and how many took over 100 ms, per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from model_builders import save_slow_start_models  # as a script: its own directory leads sys.path
from server_process import ServerProcess


def _trial(repo: Path, defer_listen: bool, seconds: float) -> dict[str, object]:
    env = {"PODSERVE_DEFER_LISTEN": str(defer_listen).lower()}
    with ServerProcess(repo, workers=2, env=env) as server:
        os.kill(min(server.worker_pids()), signal.SIGTERM)
        latencies: list[float] = []
        errors: list[str] = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                httpx.get(f"{server.url}/v2/health/live", headers={"connection": "close"})
            except httpx.HTTPError as exc:  # e.g. reset: queued on the draining worker's socket
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.monotonic() - started)
    return {
        "requests": len(latencies),
        "slowest_ms": round(max(latencies) * 1000, 1),
        "over_100ms": sum(1 for seconds in latencies if seconds > 0.1),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--models", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repo = save_slow_start_models(Path(folder), args.models)
        results: dict[str, list[dict[str, object]]] = {"defer_listen": [], "listen_at_fork": []}
        for _ in range(args.trials):
            results["defer_listen"].append(_trial(repo, True, args.seconds))
            results["listen_at_fork"].append(_trial(repo, False, args.seconds))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
