"""Where a request's time goes, told alike by Server-Timing, the phase histogram and the
dashboard: on real Gunicorn (one worker: every scrape is exact) with PostgreSQL features.

- a request that fails in or after `features` but before its input was valid (400 bad
  shape or JSON, 404 unknown model or entity id, 504 slow database) has every phase of its
  header in `podserve_phase_duration_seconds`, under its request's model label (they were
  in the header and the spans only);
- a model without a pre-processor reports `preprocess` (the batch's feed and NaN/Inf check);
- Server-Timing ends with `total` (in-app time so far), which is no phase: no histogram,
  no span;
- the stacked phase panel of the Grafana dashboard adds up to the mean request duration
  (each phase divided by the requests, not by its own count), evaluated by promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from otlp_receiver import OtlpReceiver

import postgres
from metrics_support import Scrape, scrape
from podserve.phases import PHASES, parse_server_timing
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "observability" / "grafana-dashboard.json"
FEATURES_TIMEOUT_S = 0.3
AFFINE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
DEFAULT_AFFINE = ("affine", "2")  # the test repository's newest affine version
TOTAL = re.compile(r"(?:^|,\s*)total;dur=([0-9.]+)\s*$")


@pytest.fixture(scope="module")
def db_url(
    pg_server: postgres.PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        csv = tmp_path_factory.mktemp("features") / "affine.csv"
        csv.write_text("entity_id,f0,f1,f2,f3\n" + "".join(f"e{i},{i},1,2,3\n" for i in range(10)))
        loaded = subprocess.run(
            [sys.executable, "-m", "podserve.cli", "features", "load", str(csv),
             "--set", "affine", "--database-url", url],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        yield url


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def server(
    model_repo: Path, db_url: str, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = postgres.server_env(
        db_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_FEATURES_TIMEOUT_S=str(FEATURES_TIMEOUT_S),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        PODSERVE_TRACING_ENABLED="true",
    )
    with ServerProcess(model_repo, workers=1, env=env) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


# --- reading the histograms -----------------------------------------------------------------
def _phases(s: Scrape) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(model, version, phase) -> (count, sum)."""
    out: dict[tuple[str, str, str], tuple[float, float]] = {}
    for sample in s.samples:
        kind = sample.name.removeprefix("podserve_phase_duration_seconds_")
        if kind in ("count", "sum"):
            labels = sample.labels
            key = (labels["model"], labels["version"], labels["phase"])
            count, total = out.get(key, (0.0, 0.0))
            out[key] = (
                (count + sample.value, total) if kind == "count" else (count, total + sample.value)
            )
    return out


def _requests(s: Scrape) -> dict[tuple[str, str], tuple[float, float]]:
    """(model, version) -> (count, sum) of the inference routes' request durations."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for sample in s.samples:
        kind = sample.name.removeprefix("podserve_request_duration_seconds_")
        route = sample.labels.get("route", "")
        if kind in ("count", "sum") and ("/infer" in route or ":predict" in route):
            key = (sample.labels["model"], sample.labels["version"])
            count, total = out.get(key, (0.0, 0.0))
            out[key] = (
                (count + sample.value, total) if kind == "count" else (count, total + sample.value)
            )
    return out


def _delta(after: dict, before: dict) -> dict:
    zero = (0.0, 0.0)
    return {
        key: (after[key][0] - before.get(key, zero)[0], after[key][1] - before.get(key, zero)[1])
        for key in after
        if after[key] != before.get(key, zero)
    }


def _observed(
    url: str, send: Callable[[], httpx.Response]
) -> tuple[httpx.Response, dict[tuple[str, str], tuple[float, float]], dict]:
    """One request, and what it added to the request and phase histograms (the middleware
    records after the response: wait for its request to be counted)."""
    before = scrape(url)
    response = send()
    deadline = time.monotonic() + 10
    while True:
        after = scrape(url)
        requests = _delta(_requests(after), _requests(before))
        if requests or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return response, requests, _delta(_phases(after), _phases(before))


def _assert_histogram_matches_header(
    response: httpx.Response, requests: dict, phases: dict, want_phases: set[str]
) -> tuple[str, str]:
    header = parse_server_timing(response.headers["server-timing"])
    assert set(header) == want_phases, response.headers["server-timing"]
    assert len(requests) == 1 and next(iter(requests.values()))[0] == 1, requests
    (model,) = requests  # the request duration's label: the phases are under the same one
    assert {key[2] for key in phases} == want_phases, phases
    for (name, version, phase), (count, seconds) in phases.items():
        assert (name, version) == model, (phase, model)
        assert count == 1, phase
        assert seconds == pytest.approx(header[phase] / 1000, abs=2e-6), phase
    return model


# --- 1. failed requests' phases in the histogram --------------------------------------------
def _by_ids(ids: list[str]) -> dict:
    return {"parameters": {"entity_ids": ids, "feature_set": "affine"}}


FAILURES = {
    "400 bad shape": (
        "/v2/models/affine/infer",
        {"json": {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1] * 3}]}},
        400, DEFAULT_AFFINE, {"parse"},
    ),
    "400 bad JSON": (
        "/v2/models/affine/infer",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        400, DEFAULT_AFFINE, {"parse"},
    ),
    "404 unknown model": (
        "/v2/models/nosuch/infer", {"json": AFFINE}, 404, ("", ""), {"parse"},
    ),
    "404 unknown version": (
        "/v2/models/affine/versions/9/infer", {"json": AFFINE}, 404, ("affine", ""), {"parse"},
    ),
    "404 unknown entity id (V2)": (
        "/v2/models/affine/infer", {"json": _by_ids(["e1", "ghost"])}, 404, DEFAULT_AFFINE,
        {"parse", "features"},
    ),
    "404 unknown entity id (V1)": (
        "/v1/models/affine:predict", {"json": {"entity_ids": ["ghost"]}}, 404, DEFAULT_AFFINE,
        {"parse", "features"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_requests_phases_are_in_the_histogram_under_its_model_label(
    server: ServerProcess, client: httpx.Client, case: str
) -> None:
    path, kwargs, status, model, want = FAILURES[case]
    response, requests, phases = _observed(server.url, lambda: client.post(path, **kwargs))
    assert response.status_code == status, response.text
    assert _assert_histogram_matches_header(response, requests, phases, want) == model
    # An unknown model's name creates no series of its own.
    assert not [s for s in scrape(server.url).samples if s.labels.get("model") == "nosuch"]


def test_a_slow_database_504_shows_in_the_features_histogram(
    server: ServerProcess, client: httpx.Client, db_url: str
) -> None:
    """A lock holds the feature query past PODSERVE_FEATURES_TIMEOUT_S: the 504's wait is
    in the `features` histogram, where an operator looks for a slow database."""
    with postgres.table_locked(db_url, "podserve_features"):
        response, requests, phases = _observed(
            server.url, lambda: client.post("/v2/models/affine/infer", json=_by_ids(["e2"]))
        )
    assert response.status_code == 504, response.text
    _assert_histogram_matches_header(response, requests, phases, {"parse", "features"})
    count, seconds = phases[(*DEFAULT_AFFINE, "features")]
    assert count == 1 and seconds >= FEATURES_TIMEOUT_S * 0.9, phases


# --- 2. preprocess without a pre-processor ---------------------------------------------------
def test_a_model_without_a_preprocessor_reports_preprocess(
    server: ServerProcess, client: httpx.Client
) -> None:
    """affine has no pre-processor: its batch's feed and NaN/Inf check are `preprocess`."""
    response, requests, phases = _observed(
        server.url, lambda: client.post("/v2/models/affine/infer", json=AFFINE)
    )
    assert response.status_code == 200, response.text
    header = parse_server_timing(response.headers["server-timing"])
    assert header["preprocess"] > 0, header
    _assert_histogram_matches_header(
        response, requests, phases, {"parse", "preprocess", "queue", "infer", "postprocess", "log"}
    )


# --- 3. total ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/models/affine/infer", AFFINE, 200),
        ("/v1/models/affine:predict", {"instances": [[1, 2, 3, 4]]}, 200),
        ("/v2/models/affine/infer", _by_ids(["ghost"]), 404),
    ],
    ids=["v2", "v1", "error"],
)
def test_server_timing_ends_with_the_in_app_total_which_is_no_phase(
    server: ServerProcess, client: httpx.Client, receiver: OtlpReceiver,
    path: str, body: dict, status: int,
) -> None:  # fmt: skip
    response, requests, phases = _observed(server.url, lambda: client.post(path, json=body))
    assert response.status_code == status, response.text
    raw = response.headers["server-timing"]
    match = TOTAL.search(raw)
    assert match is not None, raw
    total_ms = float(match.group(1))
    in_phases = parse_server_timing(raw)  # the phases alone, as before
    assert "total" not in in_phases and set(in_phases) <= set(PHASES)
    assert parse_server_timing(raw, with_total=True)["total"] == total_ms
    assert sum(in_phases.values()) <= total_ms + 0.001
    ((_, request_s),) = requests.values()
    assert total_ms / 1000 <= request_s  # the in-app time so far, within the request's own
    assert not [key for key in phases if key[2] == "total"]  # no histogram
    trace_id = response.headers["x-trace-id"]
    spans = receiver.wait_for(
        lambda got: len([s for s in got if s.trace_id == trace_id]) >= 1 + len(in_phases)
    )
    names = {s.name for s in spans if s.trace_id == trace_id}
    assert set(in_phases) <= names and "total" not in names  # no span


# --- 4. the dashboard's stacked phases, evaluated ---------------------------------------------
def _promtool() -> str:
    found = ROOT / ".tools" / "bin" / "promtool"
    path = str(found) if found.exists() else shutil.which("promtool")
    assert path, "promtool missing: `make tools` installs it into .tools/bin"
    return path


def _stacked_targets() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if "per phase (stacked)" in p["title"].lower()]
    return {t["legendFormat"]: t["expr"] for t in panel["targets"]}


def _concrete(expr: str) -> str:
    return (
        expr.replace("$namespace", ".*").replace("$model", ".*")
        .replace("$__rate_interval", "5m")
    )  # fmt: skip


def _series(metric: str, values: str, **labels: str) -> tuple[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {"namespace": "n", **labels}.items())
    return f"{metric}{{{inner}}}", values


REQ = "podserve_request_duration_seconds"
PHASE = "podserve_phase_duration_seconds"
INFER = {"model": "affine", "version": "2", "route": "/v2/models/{model_name}/infer"}
METRICS = {"model": "", "version": "", "route": "/metrics", "status": "200"}
SERIES = dict([
    # 1 request/s of 10 ms on the infer route (half of them 504s), all of them parse (1 ms)
    # and infer (3 ms); half of them also look up features (4 ms each: 2 ms per request).
    _series(f"{REQ}_count", "0+30x20", **INFER, status="200"),
    _series(f"{REQ}_sum", "0+0.3x20", **INFER, status="200"),
    _series(f"{REQ}_count", "0+30x20", **INFER, status="504"),
    _series(f"{REQ}_sum", "0+0.3x20", **INFER, status="504"),
    # another route: not an inference request, it must not count
    _series(f"{REQ}_count", "0+600x20", **METRICS),
    _series(f"{REQ}_sum", "0+60x20", **METRICS),
    _series(f"{PHASE}_count", "0+60x20", model="affine", version="2", phase="parse"),
    _series(f"{PHASE}_sum", "0+0.06x20", model="affine", version="2", phase="parse"),
    _series(f"{PHASE}_count", "0+60x20", model="affine", version="2", phase="infer"),
    _series(f"{PHASE}_sum", "0+0.18x20", model="affine", version="2", phase="infer"),
    _series(f"{PHASE}_count", "0+30x20", model="affine", version="2", phase="features"),
    _series(f"{PHASE}_sum", "0+0.12x20", model="affine", version="2", phase="features"),
])  # fmt: skip
# Seconds per request: the stack adds up to the mean request duration (10 ms).
EXPECTED = {"parse": 0.001, "features": 0.002, "infer": 0.003, "unattributed": 0.004}


def test_the_stacked_phase_panel_adds_up_to_the_mean_request_duration(tmp_path: Path) -> None:
    targets = _stacked_targets()
    assert set(targets) == {"{{phase}}", "unattributed"}, targets
    phases = {k: v for k, v in EXPECTED.items() if k != "unattributed"}
    checks = [
        {  # in microseconds, rounded: float rounding errors aside
            "expr": f"round(({_concrete(targets['{{phase}}'])}) * 1e6)",
            "eval_time": "10m",
            "exp_samples": [
                {"labels": f'{{phase="{name}"}}', "value": round(seconds * 1e6)}
                for name, seconds in phases.items()
            ],
        },
        {
            "expr": f"round(({_concrete(targets['unattributed'])}) * 1e6)",
            "eval_time": "10m",
            "exp_samples": [{"labels": "{}", "value": round(EXPECTED["unattributed"] * 1e6)}],
        },
    ]
    tests = {
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in SERIES.items()],
            "promql_expr_test": checks,
        }],
    }  # fmt: skip
    path = tmp_path / "stack_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [_promtool(), "test", "rules", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    description = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in description["panels"] if "per phase (stacked)" in p["title"].lower()]
    assert "unattributed" in panel["description"]
