"""Turn a benchmark's results.json into a markdown report, the targets check and PNG charts."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

TARGET_C = 32
MINILM_ORDER = ["inline", "executor", "process-pool", "podserve", "podserve-nobatch",
                "podserve-tracing", "podserve-tracing-10pct", "bentoml", "mlserver"]  # fmt: skip
PHASE_COLOURS = {
    "parse": "#8dd3c7", "features": "#ffffb3", "preprocess": "#bebada", "queue": "#fb8072",
    "infer": "#80b1d3", "postprocess": "#fdb462", "log": "#b3de69", "other": "#d9d9d9",
}  # fmt: skip

Doc = dict[str, Any]


def _points(doc: Doc) -> dict[tuple[str, int], Doc]:
    return {(p["system"], p["concurrency"]): p for p in doc["points"]}


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def best_ceiling(doc: Doc, model: str = "minilm") -> Doc | None:
    """The batch size with the highest median rows/s over the rounds."""
    points = doc["ceiling"].get(model) or []
    return max(points, key=lambda p: p["rows_per_s"]) if points else None


def ceiling_at_batch(doc: Doc, rows: float, model: str = "minilm") -> float | None:
    """The ceiling's rows/s at a (fractional) batch size, linear between measured sizes."""
    points = sorted(doc["ceiling"].get(model) or [], key=lambda p: p["batch"])
    if not points or rows < points[0]["batch"]:
        return None
    for low, high in itertools.pairwise(points):
        if low["batch"] <= rows <= high["batch"]:
            share = (rows - low["batch"]) / (high["batch"] - low["batch"])
            return low["rows_per_s"] + share * (high["rows_per_s"] - low["rows_per_s"])
    return points[-1]["rows_per_s"]


def idle_io(doc: Doc, system: str) -> float | None:
    """The I/O phase's p50 with one request in flight: nothing else can delay it."""
    point = _points(doc).get((system, 1))
    return point["median"]["io_p50"] if point else None


def system_table(doc: Doc, group: str) -> list[str]:
    rows = [
        "| system | c | req/s | p50 ms | p95 ms | p99 ms | I/O p50 | I/O p99 | I/O p99 / idle "
        "| infer p50 | infer p99 | server CPU % | server CPU ms/req | of which loops "
        "| client CPU % | failures | load avg | rows per batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [s["name"] for s in doc["systems"] if s["group"] == group]
    for name in names:
        idle = idle_io(doc, name)
        for point in sorted(
            (p for p in doc["points"] if p["system"] == name), key=lambda p: p["concurrency"]
        ):
            m = point["median"]
            ratio = m["io_p99"] / idle if idle and m["io_p99"] is not None else None
            rows.append(
                f"| {name} | {point['concurrency']} | {_f(m['throughput'])} | {_f(m['p50'])} "
                f"| {_f(m['p95'])} | {_f(m['p99'])} | {_f(m['io_p50'], 2)} | "
                f"{_f(m['io_p99'], 2)} | {_f(ratio, 2)}{'x' if ratio else ''} | "
                f"{_f(m['infer_p50'], 2)} | {_f(m['infer_p99'], 2)} | {_f(m['server_cpu'], 0)} "
                f"| {_cpu_per_req(m)} | {_f(m.get('loop_cpu_ms_per_request'), 2)} "
                f"| {_f(m['client_cpu'], 0)} | {_f(m['failures'], 0)} "
                f"| {_f(m.get('load1'))} | {_f(m.get('rows_per_batch'))} |"
            )
    return rows


def _cpu_per_req(m: Doc) -> str:
    """Server CPU ms per answered request (older results: derived from CPU % and req/s)."""
    value = m.get("cpu_ms_per_request")
    if value is None and m.get("throughput"):
        value = m["server_cpu"] * 10 / m["throughput"]
    return _f(value, 2)


def _at(doc: Doc, system: str, key: str, c: int = TARGET_C) -> float | None:
    point = _points(doc).get((system, c))
    return point["median"].get(key) if point else None


def _per_repeat(doc: Doc, system: str, key: str, idle: float) -> str:
    """Each repeat's ratio: a p99 over a few thousand requests moves a lot between repeats,
    and the reader should see how far from the bound the median sits."""
    point = _points(doc).get((system, TARGET_C))
    values = [s[key] for s in (point or {}).get("samples", []) if s.get(key) is not None]
    if len(values) < 2:
        return ""
    return " (repeats: " + ", ".join(f"{v / idle:.2f}x" for v in values) + ")"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def targets(doc: Doc) -> list[str]:
    """Each target of the issue, at concurrency 32, against figures from this same run."""
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    idle = idle_io(doc, "podserve")
    p99 = _at(doc, "podserve", "io_p99")
    inline_idle, inline_p99 = idle_io(doc, "inline"), _at(doc, "inline", "io_p99")
    if idle and p99:
        inline = f"; inline: {inline_p99 / inline_idle:.1f}x" if inline_idle and inline_p99 else ""
        rows.append(f"| I/O-phase p99 <= 1.2x idle | {p99:.2f} ms / {idle:.2f} ms = "
                    f"{p99 / idle:.2f}x{_per_repeat(doc, 'podserve', 'io_p99', idle)}{inline} "
                    f"| {_verdict(p99 / idle <= 1.2)} |")  # fmt: skip
    ceiling = best_ceiling(doc)
    rps = _at(doc, "podserve", "throughput")
    if ceiling and rps:
        share = rps / ceiling["rows_per_s"]
        rows.append(f"| throughput >= 85% of raw ORT ceiling | {rps:.0f}/s vs "
                    f"{ceiling['rows_per_s']:.0f}/s (batch {ceiling['batch']}) = {share:.0%} "
                    f"| {_verdict(share >= 0.85)} |")  # fmt: skip
    cpu_req = _at(doc, "podserve", "cpu_ms_per_request")
    if ceiling and cpu_req and ceiling.get("cpu_ms_per_row"):
        share = ceiling["cpu_ms_per_row"] / cpu_req
        rows.append(f"| same, CPU-normalised (robust to other load on the machine) | podserve "
                    f"{cpu_req:.2f} ms CPU per request vs the ceiling's "
                    f"{ceiling['cpu_ms_per_row']:.2f} ms per row = {share:.0%} "
                    f"| {_verdict(share >= 0.85)} |")  # fmt: skip
    rows_run = _at(doc, "podserve", "rows_per_batch")
    at_batch = ceiling_at_batch(doc, rows_run) if rows_run else None
    if rps and rows_run and at_batch:
        rows.append(f"| context: the ceiling at the batch size podserve ran ({rows_run:.1f} rows "
                    f"per session run) | {rps:.0f}/s vs {at_batch:.0f}/s = {rps / at_batch:.0%} "
                    f"| not a target |")  # fmt: skip
    inline_rps = _at(doc, "inline", "throughput")
    if rps and inline_rps:
        # With the same threads budget the inline variant is not slow, only unfair to I/O:
        # when it already runs at more than a third of the ceiling, 3x is out of reach.
        reach = (f"; the ceiling allows at most {ceiling['rows_per_s'] / inline_rps:.2f}x"
                 if ceiling else "")  # fmt: skip
        ratio = rps / inline_rps
        rows.append(f"| throughput >= 3x inline | {rps:.0f} vs {inline_rps:.0f}/s = "
                    f"{ratio:.2f}x{reach} | {_verdict(ratio >= 3)} |")  # fmt: skip
    client_p99, infer = _at(doc, "podserve", "p99"), _at(doc, "podserve", "infer_p50")
    if client_p99 and infer:
        bound = 2 * (2.0 + infer)  # max_batch_delay_ms of the MiniLM entry = 2
        rows.append(f"| client p99 <= 2x (batch delay + one batch's inference) | {client_p99:.1f}"
                    f" ms vs 2 x (2 + {infer:.1f}) = {bound:.1f} ms | "
                    f"{_verdict(client_p99 <= bound)} |")  # fmt: skip
    if client_p99 and infer and at_batch:
        floor = TARGET_C / at_batch * 1000  # Little's law: in flight / rate = mean latency
        rows.append(f"| context: no closed loop of {TARGET_C} has a mean latency below {TARGET_C} "
                    f"/ (ceiling at {rows_run:.1f} rows) = {floor:.1f} ms | podserve mean "
                    f"{_at(doc, 'podserve', 'latency_mean') or float('nan'):.1f} ms, p99 "
                    f"{client_p99:.1f} ms | not a target |")  # fmt: skip
    tab, const = (
        _at(doc, "podserve-tabular", "throughput"),
        _at(doc, "fastapi-constant", "throughput"),
    )
    if tab and const:
        rows.append(f"| tabular >= 70% of bare FastAPI constant | {tab:.0f} vs {const:.0f}/s = "
                    f"{tab / const:.0%} | {_verdict(tab / const >= 0.7)} |")  # fmt: skip
    for rival in ("bentoml", "mlserver"):
        r_rps, r_p99 = _at(doc, rival, "throughput"), _at(doc, rival, "p99")
        if r_rps and rps and r_p99 and client_p99:
            ok = rps > r_rps and client_p99 <= r_p99
            rows.append(f"| beats {rival}: more req/s at <= p99 | podserve {rps:.0f}/s p99 "
                        f"{client_p99:.1f} ms vs {r_rps:.0f}/s p99 {r_p99:.1f} ms "
                        f"| {_verdict(ok)} |")  # fmt: skip
        elif rival in {s["name"] for s in doc["systems"]}:
            rows.append(f"| beats {rival} | not measured (see the log) | n/a |")
    return rows


def comparisons(doc: Doc) -> list[str]:
    """Batching on/off and tracing on/off, at each concurrency, from this same run."""
    rows = [
        "| comparison | c | req/s | p99 ms | server CPU ms/req |",
        "|---|---:|---|---|---|",
    ]
    for label, base, other in (
        ("batching off vs on", "podserve", "podserve-nobatch"),
        ("tracing on (100%) vs off", "podserve", "podserve-tracing"),
        ("tracing on (10%) vs off", "podserve", "podserve-tracing-10pct"),
    ):
        for c in sorted({p["concurrency"] for p in doc["points"] if p["system"] == other}):
            a, b = _points(doc).get((base, c)), _points(doc).get((other, c))
            if not a or not b:
                continue
            ma, mb = a["median"], b["median"]
            rows.append(
                f"| {label} | {c} | {_f(mb['throughput'], 0)} vs {_f(ma['throughput'], 0)} "
                f"({_pct(mb['throughput'], ma['throughput'])}) | {_f(mb['p99'])} vs "
                f"{_f(ma['p99'])} | {_cpu_per_req(mb)} vs {_cpu_per_req(ma)} |"
            )
    return rows


def _pct(new: float | None, old: float | None) -> str:
    return f"{(new / old - 1):+.0%}" if new and old else "-"


def ceiling_table(doc: Doc) -> list[str]:
    rows = [
        "| model | batch | rows/s (median of rounds) | min - max | one session.run ms "
        "| CPU ms per row |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model in ("minilm", "tabular"):
        for p in doc["ceiling"].get(model, []):
            spread = f"{p['rows_per_s_min']:.0f} - {p['rows_per_s_max']:.0f}"
            rows.append(
                f"| {model} | {p['batch']} | {p['rows_per_s']:.0f} | {spread} | "
                f"{p['infer_ms_p50']:.3f} | {_f(p.get('cpu_ms_per_row'), 3)} |"
            )
    return rows


def markdown(doc: Doc, charts: list[str]) -> str:
    m = doc["machine"]
    settings = doc["settings"]
    parts = [
        f"# podserve benchmark, {doc['started']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, Python "
        f"{m['python']}, ONNX Runtime {m['onnxruntime']}; load average before the run "
        f"{m['load_before']}. Workers per server: {settings['workers']}; every run "
        f"{settings['duration']} s after a {settings['warmup']} s warm-up, "
        f"{settings['repeats']} repeats, medians shown; total {doc['wall_s']} s.",
        "",
        f"Command: `{doc['command']}`",
        "",
        "## Targets (concurrency 32)",
        "",
        *targets(doc),
        "",
        "## Raw ONNX Runtime ceiling (no HTTP)",
        "",
        *ceiling_table(doc),
        "",
    ]
    titles = {
        "minilm": "MiniLM: one sentence + a 5 ms awaited I/O step",
        "tabular": "Tabular model, no I/O: podserve vs the HTTP ceiling",
        "pg": "Tabular model with the real `features` phase (PostgreSQL)",
        "competitors": "Other servers, same ONNX file, same work",
    }
    for group, title in titles.items():
        if any(s["group"] == group for s in doc["systems"]):
            parts += [f"## {title}", "", *system_table(doc, group), ""]
    parts += ["## Batching and tracing, same run", "", *comparisons(doc), ""]
    parts += [f"![{c}]({c})" for c in charts]
    return "\n".join(parts) + "\n"


def charts(doc: Doc, out: Path) -> list[str]:
    """latency.png, throughput.png, phases.png; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = [n for n in MINILM_ORDER if any(p["system"] == n for p in doc["points"])]
    series = {
        n: sorted((p for p in doc["points"] if p["system"] == n), key=lambda p: p["concurrency"])
        for n in names
    }
    written = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in series.items():
        cs = [p["concurrency"] for p in pts]
        line = ax.plot(cs, [p["median"]["p99"] for p in pts], marker="o", label=f"{name} p99")
        ax.plot(cs, [p["median"]["p50"] for p in pts], ls="--", color=line[0].get_color(),
                label=f"{name} p50")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="client latency, ms",
           title="MiniLM + 5 ms I/O: latency vs concurrency")  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, out / "latency.png", plt))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in series.items():
        ax.plot([p["concurrency"] for p in pts], [p["median"]["throughput"] for p in pts],
                marker="o", label=name)  # fmt: skip
    ceiling = best_ceiling(doc)
    if ceiling:
        ax.axhline(ceiling["rows_per_s"], color="k", ls=":",
                   label=f"raw ORT ceiling (batch {ceiling['batch']})")  # fmt: skip
    ax.set(xscale="log", xlabel="concurrency", ylabel="requests/s",
           title="MiniLM + 5 ms I/O: throughput vs concurrency")  # fmt: skip
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "throughput.png", plt))
    written.append(_phase_chart(doc, names, out, plt))
    return written


def _phase_chart(doc: Doc, names: list[str], out: Path, plt: Any) -> str:
    """Mean time per phase at c=32, stacked; `other` = client latency not in any phase."""
    points = _points(doc)
    present = [n for n in names if (n, TARGET_C) in points]
    fig, ax = plt.subplots(figsize=(9, 5))
    bottoms = [0.0] * len(present)
    for phase, colour in PHASE_COLOURS.items():
        heights = []
        for name in present:
            p = points[(name, TARGET_C)]
            if phase == "other":
                known = sum(p["phase_means"].values())
                heights.append(max(0.0, p["median"]["latency_mean"] - known))
            else:
                heights.append(p["phase_means"].get(phase, 0.0))
        ax.bar(present, heights, bottom=bottoms, color=colour, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set(ylabel="mean ms per request", title=f"Where the time goes at concurrency {TARGET_C}")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return _save(fig, out / "phases.png", plt)


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write(doc: Doc, out: Path) -> str:
    text = markdown(doc, charts(doc, out))
    (out / "results.md").write_text(text)
    return text


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def publish(out: Path, page: Path) -> None:
    """Put results.md between the markers of `page` and its charts in page's folder."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{page} has no {BEGIN} ... {END} section")
    charts_dir = page.parent / "performance"
    charts_dir.mkdir(exist_ok=True)
    body = (out / "results.md").read_text().split("\n", 1)[1]  # its title: the page has one
    body = body.replace("\n## ", "\n### ")  # nested under the page's own section
    for chart in sorted(out.glob("*.png")):
        (charts_dir / chart.name).write_bytes(chart.read_bytes())
        body = body.replace(f"]({chart.name})", f"](performance/{chart.name})")
    head, rest = text.split(BEGIN, 1)
    page.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{rest.split(END, 1)[1]}")
