"""podserve load scenarios for Locust (FastHttpUser: low client CPU per request).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000          # web UI
    make loadtest                                                          # headless, bounded

User classes (weights via LOCUST_WEIGHTS; default "tabular=4,v1=1,text=2,entity=0,jobs=0";
a weight of 0 leaves the class out; entity and jobs need podserve's PostgreSQL):
  TabularV2User   V2 infer on the tabular model (one row of 30 features)
  V1PredictUser   KServe V1 predict on the tabular model
  TextUser        V2 infer on a text-embedding model (LOCUST_TEXT_MODEL: text, or minilm)
  EntityUser      V2 infer by entity id: the server fetches the features from PostgreSQL
  JobUser         background job: submit (202 + Location), then poll until done; one "job
                  outcome" per job, timed submit to done, failed unless the job succeeded
                  within LOCUST_JOB_TIMEOUT_S (default 30)

Back-off: a user answered 503 or 429 with `Retry-After` waits that long before its next task,
as a well-behaved client does (LOCUST_HONOR_RETRY_AFTER=0 turns it off, to see what clients
that retry at once do to the server; LOCUST_RETRY_AFTER_MAX_S caps the wait, default 30).
Without it, users beyond what the queue holds turn into a storm of immediate retries that
keeps the event loops busy answering 503s (docs/performance.md, "late night: overload").

Every response's `Server-Timing` header is aggregated per request name and phase; with
LOCUST_PHASES_FILE set, Locust's final per-request figures and the per-phase p50/p95/p99 are
written there as JSON when the run ends (in distributed runs the workers report their samples
to the master, which writes the file).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from email.utils import parsedate_to_datetime
from typing import Any

from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import LocalRunner, MasterRunner

FEATURES = 30  # the demo tabular model's input: FP32 [-1, 30]
TEXT_MODEL = os.environ.get("LOCUST_TEXT_MODEL", "text")
TABULAR_MODEL = os.environ.get("LOCUST_TABULAR_MODEL", "tabular")
ENTITY_COUNT = int(os.environ.get("LOCUST_ENTITY_COUNT", "1000"))  # ids patient-0000..
# A job not done this long after its submission counts as a failed "job outcome".
JOB_TIMEOUT_S = float(os.environ.get("LOCUST_JOB_TIMEOUT_S", "30"))
JOB_POLL_S = 0.05  # between polls of a job that is still queued or running
# FastHttp sends `Accept-Encoding: gzip, deflate, br` unless told otherwise, and podserve
# compresses answers of 1 KiB or more for a client that asks (the text model's embeddings,
# job results): the published figures measure uncompressed answers, so every request says so.
PLAIN = {"Accept-Encoding": "identity"}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "podserve batches requests while the inference thread is busy.",
    "Kubernetes scales the deployment when queues grow.",
    "A short sentence.",
]
# The database scenarios are opt-in (LOCUST_WEIGHTS=...,entity=1,jobs=1): without
# PODSERVE_DATABASE_URL they answer 503, so the defaults run against any podserve.
DEFAULT_WEIGHTS = {"tabular": 4, "v1": 1, "text": 2, "entity": 0, "jobs": 0}
SAMPLES_PER_KEY = 20_000  # bounded memory per (request name, phase)
HONOR_RETRY_AFTER = os.environ.get("LOCUST_HONOR_RETRY_AFTER", "1") != "0"
RETRY_AFTER_MAX_S = float(os.environ.get("LOCUST_RETRY_AFTER_MAX_S", "30"))
BACK_OFF_STATUSES = (429, 503)


def weights(spec: str | None = None) -> dict[str, int]:
    """LOCUST_WEIGHTS overrides the defaults: 'tabular=4,text=2,entity=0'. Refused with a
    message naming LOCUST_WEIGHTS: unknown names, weights that are not whole numbers >= 0,
    and all weights 0 (Locust would only say "No User class found!")."""
    spec = os.environ.get("LOCUST_WEIGHTS", "") if spec is None else spec
    result = dict(DEFAULT_WEIGHTS)
    for item in filter(str.strip, spec.split(",")):
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in result:
            known = ", ".join(result)
            raise ValueError(f"LOCUST_WEIGHTS: unknown class {name!r} in {spec!r}; known: {known}")
        if not sep or not value.isdecimal():
            raise ValueError(
                f"LOCUST_WEIGHTS: {item.strip()!r}: want name=N, N a whole number >= 0"
            )
        result[name] = int(value)
    if not any(result.values()):
        raise ValueError(f"LOCUST_WEIGHTS: {spec!r} leaves every weight at 0: nothing to run")
    return result


def tabular_row() -> list[float]:
    return [round(random.uniform(0.0, 30.0), 4) for _ in range(FEATURES)]


def v2_tensor(name: str, shape: list[int], datatype: str, data: list) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` in seconds: delay-seconds or an HTTP-date (RFC 9110); None if absent or
    unreadable. Capped at LOCUST_RETRY_AFTER_MAX_S so a bounded run stays bounded."""
    if not value:
        return None
    value, now = value.strip(), time.time() if now is None else now
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


def check_answer(
    response: Any, expected: int = 200, field: str | None = "outputs"
) -> dict[str, Any] | None:
    """The JSON body of an answer with the expected status and `field`; anything else is
    marked a failure (None). It must not raise: FastHttp's catch_response re-raises any
    other exception without reporting the request, so it would vanish from the stats."""
    text = response.text or ""  # None for no answer, or an undecodable body
    if response.status_code == 0:  # no answer: connection refused, timeout, ...
        response.failure(f"no response: {response.error!r}")
        return None
    if response.status_code != expected:
        response.failure(f"HTTP {response.status_code}: {text[:200]!r}")
        return None
    if field is None:
        return {}
    try:
        body = json.loads(text)
    except ValueError:  # e.g. a proxy's HTML page answered 200
        response.failure(f"HTTP {response.status_code} but not JSON: {text[:200]!r}")
        return None
    if not isinstance(body, dict) or field not in body:
        response.failure(f"no {field!r} in the response")
        return None
    return body


# --- Server-Timing aggregation ------------------------------------------------------------
class Reservoir:
    """A uniform sample of at most SAMPLES_PER_KEY of the `seen` values (bounded memory)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.seen = 0

    def add(self, value: float) -> None:
        """Algorithm R: the n-th value replaces a random slot with probability K/n."""
        self.seen += 1
        if len(self.samples) < SAMPLES_PER_KEY:
            self.samples.append(value)
        elif (slot := random.randrange(self.seen)) < SAMPLES_PER_KEY:
            self.samples[slot] = value

    def merge(self, samples: list[float], seen: int) -> None:
        """Fold in another reservoir (a worker's report) that stands for `seen` values, so
        each source weighs by what it saw, not by how many samples it kept."""
        if len(samples) == seen:  # every value it saw: add them one by one
            for value in samples:
                self.add(value)
            return
        # A uniform sample of the union: how many come from each side is drawn as from the
        # two populations (without replacement), then that many of each side's samples.
        size = min(SAMPLES_PER_KEY, self.seen + seen)
        mine, theirs, take = self.seen, seen, 0
        for _ in range(size):
            if random.randrange(mine + theirs) < mine:
                mine, take = mine - 1, take + 1
            else:
                theirs -= 1
        self.samples = random.sample(self.samples, take) + random.sample(samples, size - take)
        self.seen += seen


PHASE_SAMPLES: dict[tuple[str, str], Reservoir] = defaultdict(Reservoir)


def parse_server_timing(header: str) -> dict[str, float]:
    """`parse;dur=0.2, infer;dur=1.3, total;dur=2.0` -> {phase: ms}, the phases only, as
    podserve.phases.parse_server_timing (without importing it): `total` is no phase."""
    result: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() == "total":
            continue
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "dur" and name.strip():
                result[name.strip()] = float(value)
    return result


def record_phases(name: str, header: str | None) -> None:
    if not header:
        return
    for phase, ms in parse_server_timing(header).items():
        PHASE_SAMPLES[(name, phase)].add(ms)


@events.request.add_listener
def _on_request(name: str, response: Any = None, exception: Any = None, **_: Any) -> None:
    if exception is None and response is not None and getattr(response, "headers", None):
        record_phases(name, response.headers.get("Server-Timing"))


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict[str, Any]) -> None:
    data["podserve_phases"] = [[n, p, r.samples, r.seen] for (n, p), r in PHASE_SAMPLES.items()]
    PHASE_SAMPLES.clear()


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict[str, Any]) -> None:
    for name, phase, samples, seen in data.get("podserve_phases", []):
        PHASE_SAMPLES[(name, phase)].merge(samples, seen)


def phase_summary() -> list[dict[str, Any]]:
    """Per request and phase: how many were seen, and percentiles of the sample."""
    rows = []
    for (name, phase), reservoir in sorted(PHASE_SAMPLES.items()):
        ordered = sorted(reservoir.samples)

        def pct(q: float, ordered: list[float] = ordered) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

        rows.append({"name": name, "phase": phase, "count": reservoir.seen,
                     "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)})  # fmt: skip
    return rows


def request_summary(stats: Any) -> list[dict[str, Any]]:
    """Locust's final per-request figures (its CSV, written on a timer, can miss the end)."""
    rows = []
    for entry in [*sorted(stats.entries.values(), key=lambda e: e.name), stats.total]:
        if entry.num_requests == 0:
            continue
        rows.append({"name": entry.name, "count": entry.num_requests,
                     "failures": entry.num_failures, "rps": entry.total_rps,
                     "p50": entry.get_response_time_percentile(0.5),
                     "p95": entry.get_response_time_percentile(0.95),
                     "p99": entry.get_response_time_percentile(0.99)})  # fmt: skip
    return rows


@events.quitting.add_listener
def _write_summary(environment: Any, **_: Any) -> None:
    """At the very end (a master has the workers' last reports by then): LOCUST_PHASES_FILE."""
    path = os.environ.get("LOCUST_PHASES_FILE")
    if path and isinstance(environment.runner, LocalRunner | MasterRunner):
        doc = {"requests": request_summary(environment.stats), "phases": phase_summary()}
        with open(path, "w") as handle:
            json.dump(doc, handle, indent=1)


# --- users ---------------------------------------------------------------------------------
class PodserveUser(FastHttpUser):
    abstract = True
    think_time = between(0.0, 0.01)  # near closed loop; the user count sets concurrency
    connection_timeout = 10.0
    network_timeout = 30.0
    resume_at = 0.0  # time.monotonic() before which a told-to-back-off user sends nothing

    def __init__(self, environment: Any) -> None:
        # FastHttp appends each path ("/v2/...") to the host: a trailing slash would make
        # "//v2/...", which geventhttpclient refuses before Locust reports the request.
        # A path prefix (http://gateway/podserve) is kept.
        if self.host:
            self.host = self.host.rstrip("/")
        super().__init__(environment)

    def wait_time(self) -> float:
        return max(self.think_time(), self.resume_at - time.monotonic())

    def check(
        self, response: Any, expected: int = 200, field: str | None = "outputs"
    ) -> dict[str, Any] | None:
        """check_answer() plus back-off: a 503/429 with Retry-After delays the next request."""
        body = check_answer(response, expected, field)
        if HONOR_RETRY_AFTER and response.status_code in BACK_OFF_STATUSES:
            delay = retry_after_s(response.headers.get("Retry-After"))
            if delay:
                self.resume_at = max(self.resume_at, time.monotonic() + delay)
        return body


class TabularV2User(PodserveUser):
    @task
    def infer(self) -> None:
        body = v2_tensor("input", [1, FEATURES], "FP32", tabular_row())
        with self.client.post(f"/v2/models/{TABULAR_MODEL}/infer", json=body, headers=PLAIN,
                              name="v2 infer tabular", catch_response=True) as r:  # fmt: skip
            self.check(r)


class V1PredictUser(PodserveUser):
    @task
    def predict(self) -> None:
        body = {"instances": [tabular_row()]}
        with self.client.post(f"/v1/models/{TABULAR_MODEL}:predict", json=body, headers=PLAIN,
                              name="v1 predict tabular", catch_response=True) as r:  # fmt: skip
            self.check(r, field="predictions")


class TextUser(PodserveUser):
    @task
    def embed(self) -> None:
        body = v2_tensor("text", [1], "BYTES", [random.choice(SENTENCES)])
        with self.client.post(f"/v2/models/{TEXT_MODEL}/infer", json=body, headers=PLAIN,
                              name=f"v2 infer {TEXT_MODEL}", catch_response=True) as r:  # fmt: skip
            self.check(r)


class EntityUser(PodserveUser):
    @task
    def by_entity(self) -> None:
        entity = f"patient-{random.randrange(ENTITY_COUNT):04d}"
        body = {"parameters": {"entity_ids": [entity]}}  # no inputs: the server fetches them
        with self.client.post(f"/v2/models/{TABULAR_MODEL}/infer", json=body, headers=PLAIN,
                              name="v2 infer by entity id", catch_response=True) as r:  # fmt: skip
            self.check(r)


class JobUser(PodserveUser):
    think_time = between(0.05, 0.2)  # jobs are background work: a lower offered rate

    @task
    def submit_and_poll(self) -> None:
        started = time.monotonic()
        body = v2_tensor("input", [1, FEATURES], "FP32", tabular_row())
        with self.client.post(f"/v2/models/{TABULAR_MODEL}/jobs", json=body, headers=PLAIN,
                              name="job submit", catch_response=True) as r:  # fmt: skip
            accepted = self.check(r, expected=202, field="id")
            location = r.headers.get("Location") if accepted is not None else None
        if location:
            self.outcome(started, self.poll(location, started + JOB_TIMEOUT_S))

    def poll(self, location: str, deadline: float) -> str | None:
        """Polls until the job is done; None if it succeeded, else what went wrong. A 503 or
        429 is the server shedding load, not the job's fault: wait (Retry-After) and poll on."""
        while True:
            with self.client.get(location, headers=PLAIN, name="job poll",
                                 catch_response=True) as r:  # fmt: skip
                doc = self.check(r, field="status")
            if doc is not None and doc["status"] == "succeeded":
                return None
            if doc is not None and doc["status"] == "failed":
                return f"job failed: {str(doc.get('error'))[:200]}"
            if doc is None and r.status_code not in BACK_OFF_STATUSES:
                return f"job poll answered HTTP {r.status_code}"
            wait = JOB_POLL_S
            if doc is None and HONOR_RETRY_AFTER:
                wait = max(wait, retry_after_s(r.headers.get("Retry-After")) or 0.0)
            if time.monotonic() + wait > deadline:
                return f"job not done within {JOB_TIMEOUT_S:g} s (LOCUST_JOB_TIMEOUT_S)"
            time.sleep(wait)

    def outcome(self, started: float, error: str | None) -> None:
        """One "job outcome" per job: submit-to-done time, a failure unless it succeeded."""
        self.environment.events.request.fire(
            request_type="JOB",
            name="job outcome",
            response_time=(time.monotonic() - started) * 1000,
            response_length=0,
            exception=None if error is None else RuntimeError(error),
        )


def _apply_weights() -> None:
    """Weights from LOCUST_WEIGHTS; a class at 0 becomes abstract, so Locust never runs it."""
    try:
        chosen = weights()
    except ValueError as exc:  # the message alone, not a traceback from inside Locust
        raise SystemExit(str(exc)) from None
    classes = {"tabular": TabularV2User, "v1": V1PredictUser, "text": TextUser,
               "entity": EntityUser, "jobs": JobUser}  # fmt: skip
    for key, cls in classes.items():
        cls.weight = max(chosen[key], 1)  # Locust refuses weight 0; abstract leaves it out
        cls.abstract = chosen[key] == 0


_apply_weights()
