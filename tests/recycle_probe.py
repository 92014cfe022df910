"""Clients that open a connection per request against a podserve whose workers recycle.

Run in-process by tests/test_worker_recycle.py, or as a script inside a fresh network
namespace (`unshare -n`), where it may set net.ipv4.tcp_migrate_req without touching the
host's: `python tests/recycle_probe.py REPO --max-requests N --seconds S [--migrate-req]`
(`--workers 1`: a lone worker).
Prints a JSON object: outcome -> count, and how many workers were booted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import time
from pathlib import Path

from server_process import ServerProcess  # as a script: its own directory leads sys.path

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]}
).encode()
REQUEST = (
    b"POST /v2/models/tabular/infer HTTP/1.1\r\nHost: podserve\r\n"
    b"Content-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def _client(port: int, until: float, outcomes: collections.Counter[str]) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            reply = await reader.read()
            writer.close()
            outcomes[reply[9:12].decode() if reply else "empty reply"] += 1
        except OSError as exc:  # refused: no listener at all; reset: a request dropped
            outcomes[type(exc).__name__] += 1
            await asyncio.sleep(0.001)


def churn(port: int, seconds: float, concurrency: int = 8) -> dict[str, int]:
    outcomes: collections.Counter[str] = collections.Counter()

    async def run() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, until, outcomes) for _ in range(concurrency)))

    asyncio.run(run())
    return dict(outcomes)


def probe(repo: Path, max_requests: int, seconds: float, workers: int = 2) -> dict[str, object]:
    env = {"PODSERVE_MAX_REQUESTS": str(max_requests)}
    with ServerProcess(repo, workers=workers, env=env) as server:
        outcomes = churn(server.port, seconds)
        logs = server.logs()
    return {
        "outcomes": outcomes,
        "boots": logs.count("Booting worker"),
        "close_errors": logs.count("Error while closing socket"),
        "logs": logs[-4000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", type=Path)
    parser.add_argument("--max-requests", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--migrate-req", action="store_true", help="in a fresh netns only")
    args = parser.parse_args()
    if args.migrate_req:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1")
    print(json.dumps(probe(args.repo, args.max_requests, args.seconds, args.workers)))


if __name__ == "__main__":
    main()
