"""Scenario 1: a rolling update of two pods behind a readiness-aware load balancer loses nothing.

Two single-worker pods on two loopback ports behind lb_proxy (probing /v2/health/ready every
0.1 s), steady load through it. Each pod is replaced as Kubernetes does it: the endpoint is
marked terminating (the balancer stops routing to it after a propagation lag), the preStop
sleep, SIGTERM, drain, exit 0; the replacement starts meanwhile on a new port and gets
traffic once its readiness probe passes. Zero failed client requests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import soak
from lb_proxy import LoadBalancer
from server_process import ServerProcess, free_port
from traffic import Report

PROPAGATION_S = 0.3  # endpoint removal reaching the balancer (kube-proxy / ingress lag)
PRESTOP_S = 1.0  # preStop sleep: longer than the propagation lag
FAST_USERS = 6
SLOW_USERS = 1


def _slow_body(rows: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, 256],
                    "datatype": "FP32",
                    "data": [0.01] * (rows * 256),
                }
            ]
        }
    ).encode()


SLOW_BODY = _slow_body(4)  # tens of ms per row: a steady share of long requests
DRAINED_BODY = _slow_body(48)  # six batches: still running 150 ms after it was sent


def _slow_request() -> tuple[bytes, str | None]:
    headers = {"Content-Type": "application/json"}
    return soak.encode("POST", "/v2/models/slow/infer", SLOW_BODY, headers), None


class SteadyLoad:
    """Closed-loop load through the balancer in a thread of its own, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.outcomes: list[soak.Outcome] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        host, stop = "127.0.0.1", self.stop.is_set
        self.outcomes = await asyncio.gather(
            soak.closed_loop(host, self.port, soak.request_maker("affine"), FAST_USERS, 300, stop),
            soak.closed_loop(host, self.port, _slow_request, SLOW_USERS, 300, stop),
        )

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


def _drained_request(
    pod: ServerProcess,
) -> tuple[asyncio.AbstractEventLoop, asyncio.Task[soak.Reply]]:
    """A long request straight to the pod, on the wire before SIGTERM: it must still finish."""
    conn = soak.Connection("127.0.0.1", pod.port)
    request = soak.encode(
        "POST", "/v2/models/slow/infer", DRAINED_BODY, {"Content-Type": "application/json"}
    )
    loop = asyncio.new_event_loop()
    task = loop.create_task(conn.send(request))
    loop.run_until_complete(asyncio.sleep(0.15))  # connected, sent, and being worked on
    return loop, task


def _replace(
    lb: LoadBalancer, old: ServerProcess, repo: Path, everyone: list[ServerProcess]
) -> tuple[ServerProcess, dict]:
    started = time.monotonic()
    replacement = ServerProcess(repo, workers=1)
    everyone.append(replacement)  # stopped by the test whatever happens here
    boot = threading.Thread(target=replacement.start)
    boot.start()  # scheduled at once; gets traffic only when ready
    lb.add(replacement.port)
    time.sleep(PROPAGATION_S)
    lb.terminate(old.port)  # the balancer has seen the endpoint go
    time.sleep(PRESTOP_S - PROPAGATION_S)
    loop, in_flight = _drained_request(old)
    old.signal(signal.SIGTERM)
    assert not in_flight.done(), "the drained request finished before SIGTERM"
    drained = loop.run_until_complete(in_flight)
    loop.close()
    exit_code = old.proc.wait(30)
    boot.join(120)
    lb.wait_routable(replacement.port)
    lb.remove(old.port)
    return replacement, {
        "old_exit_code": exit_code,
        "drained_status": drained.status,
        "seconds": round(time.monotonic() - started, 2),
    }


def test_rolling_update_loses_no_request(model_repo: Path, report: Report) -> None:
    lb = LoadBalancer(free_port())
    pods: list[ServerProcess] = []
    everyone: list[ServerProcess] = []
    try:
        for _ in range(2):
            everyone.append(ServerProcess(model_repo, workers=1))
            pods.append(everyone[-1].start())
        for pod in pods:
            lb.add(pod.port)
            lb.wait_routable(pod.port)
        steps = []
        with SteadyLoad(lb.port) as load:
            time.sleep(1.5)
            for index in range(2):
                pods[index], step = _replace(lb, pods[index], model_repo, everyone)
                steps.append(step)
            time.sleep(1.5)  # the new pods carry the load alone
        fast, slow = load.outcomes
        state = lb.state()
    finally:
        lb.close()
        for pod in everyone:
            pod.stop()
    served_by_new = {p: e["forwarded"] for p, e in state["endpoints"].items()}
    report(
        "rolling_update",
        sent=fast.sent + slow.sent,
        failed=fast.failed + slow.failed,
        shed=fast.shed + slow.shed,
        errors={**fast.errors, **slow.errors},
        statuses={**fast.summary()["statuses"]},
        slow_statuses=slow.summary()["statuses"],
        lb_502=state["responses_502"],
        lb_503=state["responses_503"],
        lb_connect_retries=state["connect_retries"],
        new_pods_forwarded=served_by_new,
        steps=steps,
    )
    assert fast.sent > 500 and slow.sent > 10, (fast.sent, slow.sent)
    assert fast.failed == 0 and slow.failed == 0, (fast.summary(), slow.summary())
    assert state["responses_502"] == 0 and state["responses_503"] == 0, state
    # Readiness was honoured: no request was ever sent to a pod that was not listening.
    assert state["connect_retries"] == 0, state
    assert all(count > 0 for count in served_by_new.values()), served_by_new
    for step in steps:
        assert step["old_exit_code"] == 0, step
        assert step["drained_status"] == 200, step
