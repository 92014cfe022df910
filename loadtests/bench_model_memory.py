"""A model's memory and speed with ONNX Runtime's weight pre-packing on or off.

For each model and weight layout (inline in model.onnx; ONNX external data beside it; ORT's
optimized graph with its pre-packed weights in that data file), pre-packing on and off,
each variant loads in a fresh process that makes podserve's session (`make_session`) and
reads /proc/self/status once loaded and after a few runs (RSS split into anonymous memory,
each worker's own, and file-backed pages, which ORT maps from the external data file and the
pod's workers share through the page cache; VmHWM is the peak). Speed: all variants of a
model load in one process and run in turn, in short slices, at each batch size.

    .venv/bin/python -m loadtests.bench_model_memory --rounds 3
    .venv/bin/python -m loadtests.bench_model_memory --models mlp --mlp-width 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MINILM = Path(__file__).parent / "models" / "minilm" / "1" / "model.onnx"
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
LAYOUTS = ("inline", "external")


def mlp_model(width: int = 2048, layers: int = 12) -> onnx.ModelProto:
    """x FP32 [batch, width] through `layers` MatMul+Add+Relu: width^2 * 4 bytes a layer
    (2048 x 12: 192 MiB), a large tabular model whose MatMuls ORT pre-packs."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        out = "y" if i == layers - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [out]),
        ]
        previous = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_layouts(model: onnx.ModelProto, folder: Path) -> dict[str, Path]:
    """The model three times: weights inline; weights in model.onnx.data beside model.onnx;
    and ORT's optimized graph with its pre-packed weights saved to model.onnx.data too."""
    paths = {}
    for layout in LAYOUTS:
        path = folder / layout / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        external = layout == "external"
        onnx.save(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)  # fmt: skip
        paths[layout] = path
    paths["prepacked-file"] = save_prepacked(paths["external"], folder / "prepacked-file")
    return paths


def save_prepacked(source: Path, folder: Path) -> Path:
    """ORT writes the optimized graph, its pre-packed weights in the external data file
    ("session.save_external_prepacked_constant_initializers"): loaded, they are mapped."""
    import onnxruntime as ort

    folder.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "model.onnx")
    for key, value in (
        ("session.optimized_model_external_initializers_file_name", "model.onnx.data"),
        ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
        ("session.save_external_prepacked_constant_initializers", "1"),
    ):
        options.add_session_config_entry(key, value)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return folder / "model.onnx"


def _status_mib() -> dict[str, float]:
    """This process's memory (MiB) from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(rest.split()[0]) / 1024
    return values


def _feed(session: object, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs of `batch` rows; other dynamic dims are `seq` (a BERT's token inputs)."""
    rng = np.random.default_rng(1)
    feed = {}
    for node in session.get_inputs():  # type: ignore[attr-defined]
        shape = [batch] + [d if isinstance(d, int) and d > 0 else seq for d in node.shape[1:]]
        if node.type == "tensor(int64)" and "mask" in node.name:
            feed[node.name] = np.ones(shape, np.int64)
        elif node.type == "tensor(int64)":  # token ids; token *type* ids are 0
            high = 1 if "type" in node.name else 1000
            feed[node.name] = rng.integers(0, high, shape, dtype=np.int64)
        else:
            feed[node.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def child(spec: dict) -> dict:
    """One variant in this (fresh) process: memory once loaded, and after a few runs at each
    batch size (which grow ORT's arena for the activations)."""
    from podserve.onnx_model import ThreadBudget, make_session

    before = _status_mib()
    threads = ThreadBudget(intra_op=spec["threads"], inter_op=1, allow_spinning=False)
    started = time.perf_counter()
    session = make_session(Path(spec["path"]), threads, prepack_weights=spec["prepack"])
    load_s = time.perf_counter() - started
    loaded = _status_mib()
    for batch in spec["batches"]:
        feed = _feed(session, batch, spec["seq"])
        for _ in range(3):
            session.run(None, feed)
    after = _status_mib()
    return {
        "load_s": load_s,
        "loaded": {k: loaded[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "after_runs": {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "peak": after["VmHWM"] - before["VmRSS"],
    }


def paired_speed(variants: dict[str, tuple[Path, bool]], args: argparse.Namespace) -> dict:
    """Rows/s of every variant, all loaded in this process and timed in turn, slice after
    slice: a busy machine slows each variant's neighbouring slices alike, so the ratio of
    each slice to the baseline's beside it is steadier than rates from separate runs."""
    from podserve.onnx_model import ThreadBudget, make_session

    threads = ThreadBudget(intra_op=args.threads, inter_op=1, allow_spinning=False)
    sessions = {
        label: make_session(path, threads, prepack_weights=prepack)
        for label, (path, prepack) in variants.items()
    }
    base = next(iter(sessions))
    speed: dict[str, dict] = {label: {} for label in sessions}
    for batch in args.batches:
        feed = _feed(sessions[base], batch, args.seq)
        rates: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(args.slices):
            for label, session in sessions.items():
                session.run(None, feed)  # its arena and caches, after the other's
                runs, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < args.seconds or not runs:
                    session.run(None, feed)
                    runs += 1
                rates[label].append(batch * runs / elapsed)
        for label, values in rates.items():
            ratios = [v / b for v, b in zip(values, rates[base], strict=True)]
            speed[label][str(batch)] = {
                "rows_per_s": statistics.median(values),
                "ratio": statistics.median(ratios),
            }
    return speed


def _run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_model_memory", "--child", json.dumps(spec)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"variant {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def _models(args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Path]]:
    models = {}
    for name in args.models:
        if name == "mlp":
            model = mlp_model(args.mlp_width, args.mlp_layers)
        elif MINILM.exists():
            model = onnx.load(MINILM)
        else:
            print(f"skipped minilm: {MINILM} missing (make bench-model)", file=sys.stderr)
            continue
        models[name] = save_layouts(model, folder / name)
    return models


def _median(results: list[dict], *keys: str) -> float:
    values = []
    for result in results:
        value = result
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def report(name: str, memory: dict[str, list[dict]], speed: dict, batches: list[int]) -> None:
    rounds = len(next(iter(memory.values())))
    print(f"\n{name}: memory in MiB over the process before the load (medians of {rounds} "
          "fresh processes): RssAnon, RssFile once loaded; both after runs at each batch "
          "size; peak VmHWM. Rows/s: median of alternating slices (x: median ratio to the "
          "first variant's neighbouring slice)")  # fmt: skip
    head = f"{'variant':<24}{'load s':>7}{'anon':>6}{'file':>6}{'after':>10}{'peak':>6}"
    print(head + "".join(f"{'rows/s b=' + str(b):>18}" for b in batches))
    for label, results in memory.items():
        after = (f"{_median(results, 'after_runs', 'RssAnon'):.0f}/"
                 f"{_median(results, 'after_runs', 'RssFile'):.0f}")  # fmt: skip
        line = (
            f"{label:<24}{_median(results, 'load_s'):7.2f}"
            f"{_median(results, 'loaded', 'RssAnon'):6.0f}"
            f"{_median(results, 'loaded', 'RssFile'):6.0f}{after:>10}"
            f"{_median(results, 'peak'):6.0f}"
        )
        for batch in batches:
            cell = speed[label][str(batch)]
            line += f"{cell['rows_per_s']:10.0f} x{cell['ratio']:.2f}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "mlp"], choices=["minilm", "mlp"])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=0.3, help="one timed slice")
    parser.add_argument("--slices", type=int, default=9, help="timed slices per variant")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--seq", type=int, default=128, help="tokens per text (MiniLM)")
    parser.add_argument("--mlp-width", type=int, default=2048)
    parser.add_argument("--mlp-layers", type=int, default=12)
    parser.add_argument("--json", type=Path, help="write every round's results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    every: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-memory-") as tmp:
        models = _models(args, Path(tmp))
        for name, paths in models.items():
            variants = {
                f"{layout}/{'prepack' if prepack else 'no-prepack'}": (path, prepack)
                for layout, path in paths.items()
                for prepack in ((True, False) if layout in LAYOUTS else (True,))
            }
            memory: dict[str, list[dict]] = {label: [] for label in variants}
            for _ in range(args.rounds):
                for label, (path, prepack) in variants.items():
                    spec = {"path": str(path), "prepack": prepack, "threads": args.threads,
                            "batches": args.batches, "seq": args.seq}  # fmt: skip
                    memory[label].append(_run_child(spec))
            every[name] = {"memory": memory, "speed": paired_speed(variants, args)}
            report(name, memory, every[name]["speed"], args.batches)
    if args.json:
        args.json.write_text(json.dumps(every, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
