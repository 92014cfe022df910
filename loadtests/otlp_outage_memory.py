"""Worker memory while the OTLP collector is unreachable: does span export stay bounded?

`python -m loadtests.otlp_outage_memory {refused,blackhole} [--spans-per-trace 8] [--traces N]`
builds podserve's own tracer provider (Tracing.from_settings: BatchSpanProcessor, the OTLP/HTTP
exporter, every trace sampled) pointed at a collector that refuses connections, or at one
that accepts and never answers (its own process, so its memory is not counted), then records
request-shaped traces (a root and one child per phase) at a bounded rate, printing this
process's RSS and thread count every tenth of the run. The SDK's queue holds 2,048 spans and
drops the rest, so RSS should level off after the first few thousand traces.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import subprocess
import sys
import time

import psutil

BLACKHOLE = """
import selectors, socket
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            sel.register(srv.accept()[0], selectors.EVENT_READ)
        elif not key.fileobj.recv(65536):
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""
PHASES = ("parse", "features", "preprocess", "queue", "infer", "postprocess", "log")


def _collector(mode: str) -> tuple[int, subprocess.Popen[str] | None]:
    if mode == "refused":
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1], None
    child = subprocess.Popen(
        [sys.executable, "-c", BLACKHOLE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert child.stdout is not None
    return int(child.stdout.readline()), child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["refused", "blackhole"])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--per-second", type=int, default=10_000, help="upper bound on the rate")
    args = parser.parse_args()
    port, child = _collector(args.mode)
    os.environ.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_TRACES_SAMPLER="always_on",
    )
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)  # an export error per batch
    from podserve.settings import Settings
    from podserve.tracing import Tracing

    tracing = Tracing.from_settings(Settings(tracing_enabled=True))
    assert tracing is not None, "tracing did not start"
    tracer, process = tracing.tracer, psutil.Process()
    started, step = time.monotonic(), max(1, args.traces // 10)
    try:
        for i in range(args.traces + 1):
            with tracer.start_as_current_span("POST /v2/models/{model_name}/infer") as root:
                root.set_attribute("podserve.model", "tabular")
                for phase in PHASES:
                    tracer.start_span(phase).end()
            if i % step == 0:
                gc.collect()
                rss = process.memory_info().rss / 1e6
                print(f"{i:>8} traces  rss {rss:6.1f} MB  threads {process.num_threads()}  "
                      f"{time.monotonic() - started:5.1f} s", flush=True)  # fmt: skip
            behind = i / args.per_second - (time.monotonic() - started)
            if behind > 0:
                time.sleep(behind)
    finally:
        if child is not None:
            child.kill()
        os._exit(0)  # no shutdown flush to a collector that never answers


if __name__ == "__main__":
    main()
