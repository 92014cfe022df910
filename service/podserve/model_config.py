"""Per-model configuration: `<model>/config.yaml` (or .json) in the model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from podserve.datatypes import V2_TO_NUMPY

# Read in this order: the first that exists (a config.json beside a YAML one may be Hugging
# Face's, as exporters write it next to the tokenizer).
CONFIG_NAMES = ("config.yaml", "config.yml", "config.json")

# Upper bounds keep every number a served config echoes (metadata, Triton's config: delay
# in microseconds) finite and within 64 bits, and far above any sensible value.
MAX_INT32 = 2**31 - 1
MAX_BATCH_DELAY_MS = 60_000.0  # a minute: a wait for more rows is meant in milliseconds

# -1: dynamic; ONNX dims are int64.
Dim = Annotated[int, Field(ge=-1, le=2**63 - 1)]


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str
    shape: list[Dim]

    def model_post_init(self, __context: Any) -> None:
        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"unknown datatype {self.datatype!r}")


class ProcessorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(BaseModel):
    """Everything optional: a bare `<model>/<version>/model.onnx` is served with defaults."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, le=MAX_INT32)
    max_batch_delay_ms: float | None = Field(None, ge=0, le=MAX_BATCH_DELAY_MS, allow_inf_nan=False)
    batching: bool = True
    allow_nonfinite: bool | None = None
    preprocessor: ProcessorSpec | None = None
    postprocessor: ProcessorSpec | None = None
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    # output -> class labels (a list, or a file in the model's directory, one per line)
    labels: dict[str, list[str] | str] = Field(default_factory=dict)
    # false: ORT's "session.disable_prepacking" (less memory per worker, see README)
    prepack_weights: bool = True


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read config.yaml / config.yml / config.json, or defaults if none exists."""
    for name in CONFIG_NAMES:
        path = model_dir / name
        if not path.exists():
            continue
        try:
            text = path.read_bytes()
            raw = orjson.loads(text) if name.endswith(".json") else yaml.safe_load(text)
            return ModelConfig.model_validate(raw or {})
        except (ValidationError, ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: invalid model config: {exc}") from exc
    return ModelConfig()
