"""Placeholder load test for the chart's distributed Locust: V2 inference on demo `tabular`.

The project's real scenarios live in loadtests/locustfile.py; copy it here to run them in-cluster.
"""

from __future__ import annotations

import random

from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

FEATURES = 30  # the demo tabular model's input is FP32 [-1, 30]


class TabularInferUser(FastHttpUser):
    # One request per second per user: the user count sets the offered rate.
    wait_time = constant_throughput(1)

    @task
    def infer(self) -> None:
        row = [random.uniform(-1.0, 1.0) for _ in range(FEATURES)]
        body = {
            "inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": row}]
        }
        with self.client.post(
            "/v2/models/tabular/infer", json=body, name="infer tabular", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif "outputs" not in resp.json():
                resp.failure("no outputs in response")
