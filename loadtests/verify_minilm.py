"""Check podserve's MiniLM pipeline against sentence-transformers (cosine > 0.999 per sentence).

`python -m loadtests.verify_minilm DIR` in the runtime venv: loads DIR's parent as a model
repository with podserve's own loader (tokenizer pre-processor, ONNX Runtime, mean pooling),
embeds the sentences of DIR/reference.json in one batch and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from podserve.model_repository import load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings

MIN_COSINE = 0.999


def cosines(model_dir: Path) -> list[float]:
    reference = json.loads((model_dir / "reference.json").read_text())
    repo = load_repository(model_dir.parent, Settings(), ThreadBudget(1, 1, False))
    model = repo.get(model_dir.name)
    texts = np.array(reference["sentences"], dtype=object)
    inputs, rows = model.validate({"text": texts})
    got = model.run_batch([inputs], [rows]).outputs[0]["embedding"]
    want = np.array(reference["embeddings"], dtype=np.float32)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return [float(c) for c in (got * want).sum(axis=1) / norms]


def main() -> int:
    model_dir = Path(sys.argv[1])
    values = cosines(model_dir)
    worst = min(values)
    print(f"podserve vs sentence-transformers: cosine min {worst:.6f} over {len(values)} sentences")
    if worst <= MIN_COSINE:
        print(f"FAIL: cosine {worst:.6f} <= {MIN_COSINE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
