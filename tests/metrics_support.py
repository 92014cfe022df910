"""Helpers for the observability tests: scraping /metrics and reading samples."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@dataclass
class Scrape:
    worker: str
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def find(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def scrape(url: str, openmetrics: bool = False) -> Scrape:
    """One scrape on a fresh connection (so the kernel may hand it to either worker)."""
    headers = {"accept": OPENMETRICS} if openmetrics else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    samples = [s for family in parse(response.text) for s in family.samples]
    return Scrape(response.headers["x-podserve-worker"], samples)


def wait_for_in_flight(url: str, count: int, timeout: float = 30.0) -> None:
    """Until a one-worker server has `count` requests in flight. Its scrape counts them exactly
    (the answering worker writes its own count first; the scrape is not counted), where a
    fixed sleep can end before a request sent from another thread has even connected (a new
    httpx client took 0.4 s on a loaded 2-core machine)."""
    deadline = time.monotonic() + timeout
    while (seen := scrape(url).value("podserve_inflight_requests")) != count:
        assert time.monotonic() < deadline, f"{seen} requests in flight, not {count}"
        time.sleep(0.05)


def arrivals(result: Scrape, model: str) -> float:
    """Requests for `model` that reached the server: in flight (of any model) or answered.
    Never more than the truth: each worker writes its in-flight count and its answered
    counts together, and the answering worker's own are exact."""
    inflight = result.value("podserve_inflight_requests")
    return inflight + result.value("podserve_requests_total", model=model)


def wait_for_arrivals(url: str, model: str, count: float, timeout: float = 60.0) -> None:
    """Until `count` requests for `model` reached the server (see arrivals)."""
    deadline = time.monotonic() + timeout
    while (seen := arrivals(scrape(url), model)) < count:
        assert time.monotonic() < deadline, f"{seen} requests reached the server, not {count}"
        time.sleep(0.05)
