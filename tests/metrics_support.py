"""Helpers for the observability tests: scraping /metrics and reading samples."""

from __future__ import annotations

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
