"""Per-worker request share under test_under_load's keep-alive load (balancing off).

`cd tests && python spread_probe.py --runs 6`: per run, a 2-worker podserve, 32 closed-loop
users for 3 s (tests/load_client.py), and how the kernel split their connections and how
the requests followed. The requests should follow the connections: a load client that
piles requests onto some connections shows a lower share than its connection split.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import Counter
from pathlib import Path

# As a script: its own directory leads sys.path.
from load_client import AFFINE, closed_loop
from model_builders import build_test_repository
from server_process import ServerProcess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repo = build_test_repository(Path(folder))
        for _ in range(args.runs):
            env = {"PODSERVE_BALANCE_CONNECTIONS": "false"}
            with ServerProcess(repo, workers=2, env=env) as server:
                result = asyncio.run(
                    closed_loop(server.url, "/v2/models/affine/infer", AFFINE, 32, 3.0, 20000)
                )
            split = sorted(Counter(worker for worker, _ in result.connections).values())
            share = min(result.workers.values()) / result.total
            print(f"connections {split[0]}/{split[-1]}, requests of the lesser worker {share:.2f}")


if __name__ == "__main__":
    main()
