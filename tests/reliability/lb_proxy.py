"""A small HTTP load balancer that honours readiness, like a Kubernetes Service + ingress.

Run as a process of its own (`python lb_proxy.py --port P`): it shares no GIL with the
load generator. Endpoints (loopback ports) are added, marked terminating and removed over
`/__lb/...` on the same port; `LoadBalancer` below drives it.

- Readiness: every endpoint's `/v2/health/ready` is probed every `--probe-s` seconds; only
  endpoints whose last probe answered 200, and that are not terminating, get requests (an
  endpoint being deleted is taken out at once, as an EndpointSlice marks it terminating).
- Forwarding: like nginx's defaults, one upstream connection per request (`Connection:
  close` upstream, keep-alive to the client). A request is retried on another endpoint only
  when the upstream *connection* fails, i.e. before a byte of it was sent; any failure after
  that is a 502 to the client, and counted: the proxy never hides a lost request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

CONNECT_TIMEOUT_S = 2.0
NO_ENDPOINT_WAIT_S = 5.0  # a request waits this long for a ready endpoint, then 503
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


@dataclass
class Endpoint:
    port: int
    ready: bool = False
    terminating: bool = False
    forwarded: int = 0
    upstream_errors: int = 0
    probes_failed: int = 0


@dataclass
class Balancer:
    probe_s: float
    endpoints: dict[int, Endpoint] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)
    responses_502: int = 0
    responses_503: int = 0
    connect_retries: int = 0

    def routable(self) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.ready and not e.terminating]

    async def pick(self) -> Endpoint | None:
        deadline = time.monotonic() + NO_ENDPOINT_WAIT_S
        while time.monotonic() < deadline:
            candidates = self.routable()
            if candidates:
                return candidates[next(self.counter) % len(candidates)]
            await asyncio.sleep(0.01)
        return None

    async def probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(e) for e in list(self.endpoints.values())))
            await asyncio.sleep(self.probe_s)

    async def _probe(self, endpoint: Endpoint) -> None:
        try:
            async with asyncio.timeout(0.5):
                reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
                writer.write(
                    b"GET /v2/health/ready HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
                )
                status_line = await reader.readline()
                writer.close()
            endpoint.ready = status_line.startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            endpoint.ready = False
        if not endpoint.ready:
            endpoint.probes_failed += 1

    def state(self) -> dict:
        return {
            "endpoints": {str(p): vars(e) for p, e in self.endpoints.items()},
            "responses_502": self.responses_502,
            "responses_503": self.responses_503,
            "connect_retries": self.connect_retries,
        }


@dataclass
class Message:
    head: str  # request or status line
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def encode(self, connection: str) -> bytes:
        lines = [self.head] + [
            f"{k}: {v}"
            for k, v in self.headers
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
        ]
        lines += [f"Content-Length: {len(self.body)}", f"Connection: {connection}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


async def read_message(reader: asyncio.StreamReader, until_eof: bool = False) -> Message | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None  # clean EOF between messages
    head, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    message = Message(head, headers, b"")
    length = message.header("content-length")
    if length is not None:
        message.body = await reader.readexactly(int(length))
    elif until_eof:
        message.body = await reader.read()
    return message


def simple_response(status: int, reason: str, body: dict) -> Message:
    payload = json.dumps(body).encode()
    return Message(f"HTTP/1.1 {status} {reason}", [("Content-Type", "application/json")], payload)


class Proxy:
    def __init__(self, balancer: Balancer) -> None:
        self.lb = balancer

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_message(reader)
                if request is None:
                    break
                reply = await self.handle(request)
                writer.write(reply.encode("keep-alive"))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, request: Message) -> Message:
        path = request.head.split(" ")[1]
        if path.startswith("/__lb/"):
            return self.control(request.head.split(" ")[0], path)
        tried: set[int] = set()
        while True:
            endpoint = await self.lb.pick()
            if endpoint is None or endpoint.port in tried:
                self.lb.responses_503 += 1
                return simple_response(503, "Service Unavailable", {"error": "no ready endpoint"})
            tried.add(endpoint.port)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
            except (OSError, TimeoutError):
                endpoint.ready = False  # nothing was sent: safe to try another endpoint
                self.lb.connect_retries += 1
                continue
            return await self.forward(endpoint, request, up_reader, up_writer)

    async def forward(
        self,
        endpoint: Endpoint,
        request: Message,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> Message:
        try:
            writer.write(request.encode("close"))
            await writer.drain()
            reply = await read_message(reader, until_eof=True)
            if reply is None:
                raise ConnectionResetError("upstream closed without a response")
            endpoint.forwarded += 1
            return reply
        except (OSError, asyncio.IncompleteReadError) as exc:
            endpoint.upstream_errors += 1
            self.lb.responses_502 += 1
            return simple_response(502, "Bad Gateway", {"error": f"upstream: {exc!r}"})
        finally:
            writer.close()

    def control(self, method: str, path: str) -> Message:
        url = urlsplit(path)
        port = int(parse_qs(url.query).get("port", ["0"])[0])
        action = url.path.removeprefix("/__lb/")
        if action == "add":
            self.lb.endpoints.setdefault(port, Endpoint(port))
        elif action == "terminate":
            self.lb.endpoints[port].terminating = True
        elif action == "remove":
            self.lb.endpoints.pop(port, None)
        elif action != "state":
            return simple_response(404, "Not Found", {"error": action})
        return simple_response(200, "OK", self.lb.state())


async def serve(port: int, probe_s: float) -> None:
    balancer = Balancer(probe_s)
    proxy = Proxy(balancer)
    server = await asyncio.start_server(proxy.client, "127.0.0.1", port, backlog=1024)
    prober = asyncio.create_task(balancer.probe_forever())
    print("listening", flush=True)
    async with server:
        await server.serve_forever()
    prober.cancel()


class LoadBalancer:
    """Runs lb_proxy.py in a subprocess and drives it over its control paths."""

    def __init__(self, port: int, probe_s: float = 0.1) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--port", str(port), "--probe-s", str(probe_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "listening":
            raise RuntimeError("load balancer did not start")

    def _call(self, action: str, port: int = 0) -> dict:
        response = httpx.post(f"{self.url}/__lb/{action}?port={port}", timeout=5)
        response.raise_for_status()
        return response.json()

    def add(self, port: int) -> None:
        self._call("add", port)

    def terminate(self, port: int) -> None:
        self._call("terminate", port)

    def remove(self, port: int) -> None:
        self._call("remove", port)

    def state(self) -> dict:
        return self._call("state")

    def wait_routable(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            endpoint = self.state()["endpoints"].get(str(port))
            if endpoint and endpoint["ready"] and not endpoint["terminating"]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"endpoint {port} not ready in the load balancer after {timeout}s")

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--probe-s", type=float, default=0.1)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.probe_s))


if __name__ == "__main__":
    main()
