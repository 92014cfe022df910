"""The Locust scenarios run headless against a real podserve and report Server-Timing phases."""

from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server_process import free_port

ROOT = Path(__file__).resolve().parents[2]


def _in_subprocess(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Importing Locust monkey-patches the process (gevent): keep it out of pytest's."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_weights_parse_and_reject_unknown_classes() -> None:
    code = "import loadtests.locustfile as l; print(l.weights()['tabular'], l.JobUser.abstract)"
    done = _in_subprocess(code, {"LOCUST_WEIGHTS": "tabular=2,jobs=0"})
    assert done.stdout.split() == ["2", "True"], done.stderr[-2000:]
    done = _in_subprocess(code, {"LOCUST_WEIGHTS": "nonsense=1"})
    assert done.returncode != 0 and "unknown class" in done.stderr


def test_server_timing_parser_matches_podserve() -> None:
    header = "parse;dur=0.212, queue;dur=0.041, infer;dur=0.377, total;dur=0.930"
    code = (
        "import loadtests.locustfile as l; from podserve.phases import parse_server_timing as p; "
        f"h = {header!r}; print(l.parse_server_timing(h) == p(h) == "
        "{'parse': 0.212, 'queue': 0.041, 'infer': 0.377})"
    )
    done = _in_subprocess(code)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_retry_after_parses_seconds_and_dates_and_is_capped() -> None:
    code = (
        "import loadtests.locustfile as l; from email.utils import formatdate; "
        "print(l.retry_after_s('2'), l.retry_after_s(' 0 '), l.retry_after_s(None), "
        "l.retry_after_s('soon'), l.retry_after_s('-3'), l.retry_after_s('999'), "
        "round(l.retry_after_s(formatdate(1000.0 + 7, usegmt=True), now=1000.0)), "
        "l.retry_after_s(formatdate(1000.0 - 7, usegmt=True), now=1000.0))"
    )
    done = _in_subprocess(code, {"LOCUST_RETRY_AFTER_MAX_S": "30"})
    assert done.stdout.split() == ["2.0", "0.0", "None", "None", "None", "30.0", "7", "0.0"], (
        done.stderr[-2000:]
    )


def _run_locust(url: str, tmp_path: Path, env: dict[str, str], users: int = 4,
                seconds: int = 3) -> dict[str, dict[str, str]]:  # fmt: skip
    """A headless run; its per-request rows from the stats CSV."""
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
           "--headless", "--host", url, "--users", str(users), "--spawn-rate", str(users),
           "--run-time", f"{seconds}s", "--stop-timeout", "2", "--csv", str(tmp_path / "run"),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_users_back_off_as_retry_after_says(shedding_server, tmp_path: Path) -> None:
    """Every entity request is answered 503 + Retry-After: 1. Honouring it, a user sends at
    most one request per second; ignoring it (opt-out), users retry at once and send many
    times that, which is what the bound below must tell apart."""
    users, seconds = 4, 3
    bound = users * (seconds + 1)  # one request per user per second, plus the first one
    weights = {"LOCUST_WEIGHTS": "tabular=0,v1=0,text=0,entity=1,jobs=0"}
    url = shedding_server.url
    polite = _run_locust(url, tmp_path, weights, users, seconds)
    rude = _run_locust(url, tmp_path, {**weights, "LOCUST_HONOR_RETRY_AFTER": "0"}, users, seconds)
    name = "v2 infer by entity id"
    for rows in (polite, rude):  # every answer was the 503 (a failure in Locust's terms)
        assert rows[name]["Failure Count"] == rows[name]["Request Count"], rows[name]
    assert 0 < int(polite[name]["Request Count"]) <= bound, polite[name]
    assert int(rude[name]["Request Count"]) > 4 * bound, rude[name]


def test_headless_run_against_podserve(server, tmp_path: Path) -> None:
    env = {
        "LOCUST_WEIGHTS": "tabular=2,v1=1,text=1,entity=0,jobs=0",
        "LOCUST_TEXT_MODEL": "text",
        "LOCUST_PHASES_FILE": str(tmp_path / "phases.json"),
    }
    rows = _run_locust(server.url, tmp_path, env)
    for name in ("v2 infer tabular", "v1 predict tabular", "v2 infer text"):
        assert int(rows[name]["Request Count"]) > 0, rows.keys()
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
    doc = json.loads((tmp_path / "phases.json").read_text())
    phases = {(r["name"], r["phase"]): r["count"] for r in doc["phases"]}
    assert phases[("v2 infer text", "infer")] > 0 and ("v2 infer text", "preprocess") in phases
    final = {r["name"]: r for r in doc["requests"]}
    # Every answered request carried a Server-Timing header, and the listener saw all of them.
    assert final["v2 infer tabular"]["count"] == phases[("v2 infer tabular", "infer")]
    assert final["Aggregated"]["failures"] == 0
    for name in ("v2 infer tabular", "v1 predict tabular", "v2 infer text"):
        assert int(rows[name]["Request Count"]) <= final[name]["count"]  # the CSV may lag


def test_helm_chart_ships_the_same_locustfile() -> None:
    """The chart's distributed Locust mounts files/locustfile.py: it must be this one."""
    root = Path(__file__).resolve().parents[2]
    chart_copy = root / "helm" / "podserve" / "files" / "locustfile.py"
    assert chart_copy.read_text() == (root / "loadtests" / "locustfile.py").read_text(), (
        "run: cp loadtests/locustfile.py helm/podserve/files/locustfile.py"
    )


# --- failures are counted, whatever the server does ----------------------------------------
class FakePodserve(BaseHTTPRequestHandler):
    """A stand-in for podserve, answering as the test's `kind` says: "json" (well-formed
    answers), "html" (a proxy's page with 200), or jobs by id n: n % 4 == 0 fails, 1 never
    finishes, 2 is shed once (503 + Retry-After: 1) then succeeds, 3 succeeds."""

    protocol_version = "HTTP/1.1"
    server: FakeServer

    def _send(self, code: int, doc: dict | bytes, **headers: str) -> None:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(code)
        headers = {"Content_Type": "application/json", **headers}
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        if self.path.endswith("/jobs"):
            n = next(self.server.jobs)
            self._send(202, {"id": str(n), "status": "queued"}, Location=f"/v2/jobs/{n}")
        elif self.server.kind == "html":
            self._send(200, b"<html>default backend</html>", Content_Type="text/html")
        else:
            self._send(200, {"outputs": [], "predictions": []})

    def do_GET(self) -> None:
        n = int(self.path.rsplit("/", 1)[1])
        self.server.polls[n] += 1
        if n % 4 == 2 and self.server.polls[n] == 1:
            self._send(503, {"error": "shedding"}, Retry_After="1")
        else:
            status = {0: "failed", 1: "running", 2: "succeeded", 3: "succeeded"}[n % 4]
            self._send(200, {"id": str(n), "status": status, "error": "boom"})

    def log_message(self, *_: object) -> None:
        pass


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, kind: str) -> None:
        super().__init__(("127.0.0.1", 0), FakePodserve)
        self.kind, self.paths, self.jobs = kind, [], itertools.count()
        self.polls: collections.Counter[int] = collections.Counter()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def fake_server(kind: str) -> Iterator[FakeServer]:
    server = FakeServer(kind)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _final_run(host: str, tmp_path: Path, weights: str, seconds: int = 2,
               env: dict[str, str] | None = None) -> tuple[dict[str, dict], str]:  # fmt: skip
    """A short headless run: Locust's final per-request figures (LOCUST_PHASES_FILE), and its
    console output, whose error report is final too (the CSV files lag)."""
    phases = tmp_path / f"phases-{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
           "--headless", "--host", host, "--users", "2", "--spawn-rate", "2",
           "--run-time", f"{seconds}s", "--stop-timeout", "3", "--only-summary",
           "--loglevel", "WARNING", "--exit-code-on-error", "0"]  # fmt: skip
    env = {"LOCUST_WEIGHTS": weights, "LOCUST_PHASES_FILE": str(phases), **(env or {})}
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=90, check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    rows = {row["name"]: row for row in json.loads(phases.read_text())["requests"]}
    return rows, output


ONLY_TABULAR = "tabular=1,v1=0,text=0"


def test_a_dead_server_counts_every_request_as_failed(tmp_path: Path) -> None:
    """Connection refused: each request is a failure with the reason, not an exception
    that FastHttp re-raises without reporting (which showed 0 requests, 0 failures)."""
    rows, output = _final_run(f"http://127.0.0.1:{free_port()}", tmp_path, ONLY_TABULAR)
    row = rows["v2 infer tabular"]
    assert row["count"] > 0 and row["failures"] == row["count"], (row, output[-3000:])
    assert "no response: ConnectionRefusedError" in output and "Traceback" not in output, output


def test_a_non_json_200_is_a_failure(tmp_path: Path) -> None:
    with fake_server("html") as server:
        rows, output = _final_run(server.url, tmp_path, "tabular=1,v1=1,text=0")
    for name in ("v2 infer tabular", "v1 predict tabular"):
        assert 0 < rows[name]["failures"] == rows[name]["count"], (rows, output[-3000:])
    assert "but not JSON: '<html>" in output and "Traceback" not in output, output


def test_host_with_trailing_slash_and_path_prefix(tmp_path: Path) -> None:
    """FastHttp appends the path to the host: `http://h:p/` must not make `//v2/...`."""
    with fake_server("json") as server:
        rows, output = _final_run(server.url + "/", tmp_path, ONLY_TABULAR)
        assert rows["v2 infer tabular"]["failures"] == 0 < rows["v2 infer tabular"]["count"], (
            output[-3000:]
        )
        assert set(server.paths) == {"/v2/models/tabular/infer"}, set(server.paths)
        server.paths.clear()
        rows, output = _final_run(server.url + "/gateway/podserve/", tmp_path, ONLY_TABULAR)
        assert rows["v2 infer tabular"]["failures"] == 0 < rows["v2 infer tabular"]["count"]
        assert set(server.paths) == {"/gateway/podserve/v2/models/tabular/infer"}, output


def test_every_job_has_an_outcome(tmp_path: Path) -> None:
    """One "job outcome" per finished job, timed submit to done: failed jobs and jobs not
    done within LOCUST_JOB_TIMEOUT_S fail; a poll shed with 503 + Retry-After is waited
    out and the job, once done, succeeds."""
    env = {"LOCUST_JOB_TIMEOUT_S": "1.5"}
    with fake_server("json") as server:
        rows, output = _final_run(server.url, tmp_path, "tabular=0,v1=0,text=0,jobs=1", 5, env)
    outcome = rows["job outcome"]
    assert 0 < outcome["failures"] < outcome["count"], (outcome, output[-3000:])
    assert outcome["p50"] > 0, outcome  # submit-to-done time, not 0
    assert "job outcome: RuntimeError('job failed: boom')" in output, output
    assert "job outcome: RuntimeError('job not done within 1.5 s" in output, output
    assert "job poll answered" not in output, output  # the 503 is not the job's failure
    shed = [n for n in server.polls if n % 4 == 2]
    assert shed and all(server.polls[n] >= 2 for n in shed), server.polls  # polled on


# --- Server-Timing samples -------------------------------------------------------------------
def test_reservoirs_sample_uniformly_locally_and_on_the_master() -> None:
    """Feeding 0..99,999 keeps about half the samples from the first half; the master merges
    its workers' reports weighted by how many values each saw, not first come first kept."""
    code = """if True:
        import json, random
        import loadtests.locustfile as l
        random.seed(1)
        def first_share(values, below):
            return round(sum(v < below for v in values) / len(values), 3)
        # a worker (or a local run): 100,000 values through the request listener's path
        for v in range(100_000):
            l.record_phases("n", f"infer;dur={v}")
        local = list(l.PHASE_SAMPLES[("n", "infer")].samples)
        report = {}
        l._to_master("w2", report)  # its report, and its reservoir is emptied
        # on the master: worker 1 reported 50,000 values in small complete batches first
        for start in range(-50_000, 0, 5_000):
            l._from_worker("w1", {"podserve_phases": [["n", "infer",
                           [float(v) for v in range(start, start + 5_000)], 5_000]]})
        l._from_worker("w2", report)
        (row,) = l.phase_summary()
        merged = l.PHASE_SAMPLES[("n", "infer")].samples
        print(json.dumps([len(local), first_share(local, 50_000), row["count"], len(merged),
                          first_share(merged, 0)]))
    """
    done = _in_subprocess(code)
    assert done.returncode == 0, done.stderr[-3000:]
    kept, local_share, seen, merged, worker1_share = json.loads(done.stdout)
    assert kept == 20_000 and abs(local_share - 0.5) < 0.03, local_share
    assert seen == 150_000 and merged == 20_000
    assert abs(worker1_share - 1 / 3) < 0.03, worker1_share  # 50,000 of the 150,000 seen


# --- LOCUST_WEIGHTS ----------------------------------------------------------------------------
def test_weights_are_validated_with_clear_messages() -> None:
    specs = {
        "tabular": "want name=N",
        "tabular=": "want name=N",
        "tabular=-2": "want name=N",
        "tabular=1.5": "want name=N",
        "Tabular=1": "known: tabular, v1, text, entity, jobs",
        "tabular=0,v1=0,text=0": "every weight at 0",
        "tabular=4;text=2": "want name=N",
    }
    code = f"""if True:
        import json
        import loadtests.locustfile as l
        result = {{}}
        for spec in {list(specs)!r} + [" v1 = 2 ,tabular=0,", ""]:
            try:
                result[spec] = l.weights(spec)
            except ValueError as exc:
                result[spec] = str(exc)
        print(json.dumps(result))
    """
    done = _in_subprocess(code)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for spec, message in specs.items():
        assert result[spec].startswith("LOCUST_WEIGHTS: ") and message in result[spec], spec
    assert result[" v1 = 2 ,tabular=0,"] == {"tabular": 0, "v1": 2, "text": 2, "entity": 0,
                                             "jobs": 0}  # fmt: skip
    assert result[""]["tabular"] == 4
    # At start-up, Locust stops with the message rather than a traceback.
    done = _in_subprocess("import loadtests.locustfile", {"LOCUST_WEIGHTS": "tabular=-1"})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "LOCUST_WEIGHTS: 'tabular=-1'" in done.stderr, done.stderr


# --- run_locust, make and docs --------------------------------------------------------------
def test_run_locust_takes_locust_run_times() -> None:
    from loadtests import run_locust

    assert [run_locust.run_time_s(t) for t in ("1m30s", "45", "2h", "30s")] == [90, 45, 7200, 30]
    assert run_locust.parse_args(["--run-time", "1m30s"]).run_time == "1m30s"
    with pytest.raises(SystemExit):
        run_locust.parse_args(["--run-time", "1.5m"])


def test_run_locust_reports_a_failed_locust(tmp_path: Path) -> None:
    """Locust refusing to start (bad weights): its error, then a line saying so, non-zero;
    no FileNotFoundError for the summary it never wrote."""
    cmd = [sys.executable, "-m", "loadtests.run_locust", "--host",
           f"http://127.0.0.1:{free_port()}", "--weights", "tabular=0,v1=0,text=0",
           "--run-time", "2s", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "LOCUST_WEIGHTS:" in output and "Locust exited with code 1" in output, output
    assert "Traceback" not in output, output


def test_make_loadtest_does_not_build_minilm() -> None:
    """run_locust falls back to the `text` model; MiniLM (and torch) only via bench-model."""
    done = subprocess.run(["make", "-n", "-p", "loadtest"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    (rule,) = re.findall(r"^loadtest:(.*)$", done.stdout, re.MULTILINE)
    assert "minilm" not in rule.lower(), rule


def test_docs_distributed_example_sets_the_same_weights_on_master_and_workers() -> None:
    section = (ROOT / "docs" / "performance.md").read_text().split("### Distributed Locust")[1]
    commands = section.split("```sh")[1].split("```")[0].replace("\\\n", " ")
    weights = {
        role: re.search(rf"^(\S*)\s*locust .*--{role}\b", commands, re.MULTILINE)
        for role in ("master", "worker")
    }
    assert all(weights.values()), commands
    master, worker = (weights[r].group(1) for r in ("master", "worker"))
    assert master.startswith("LOCUST_WEIGHTS=") and master == worker, commands
