"""Build the two demo models (``tabular``, ``text``) into a model repository, offline.

Layout: ``DEST/<model>/config.yaml`` + ``DEST/<model>/1/model.onnx`` (+ ``tokenizer.json``).
scikit-learn, skl2onnx and onnx are build-time only (the ``demo`` extra): they are imported
inside the functions so that importing this module works in the runtime image.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HIDDEN = 32  # embedding width of the text encoder
MAX_POSITIONS = 128  # = the tokenizer pre-processor's max_length
VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # [PAD] must be id 0: the runtime pads 0s
ONNX_OPSET = 17
ONNX_ML_OPSET = 3
IR_VERSION = 8  # the IR of opset 17: loadable by every onnxruntime >= 1.18 we support

# Local corpus for the tokenizer: docstrings of a fixed list of stdlib modules.
# fmt: off
CORPUS_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "hmac", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "queue",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)
# fmt: on


class MissingBuildDependency(RuntimeError):
    """A build-time package (the `demo` extra) is not installed."""


def _require_build_deps() -> None:
    try:
        for name in ("sklearn", "skl2onnx", "onnx"):
            importlib.import_module(name)
    except ImportError as exc:
        raise MissingBuildDependency(
            f"building the demo models needs {exc.name!r}: pip install 'podserve[demo]'"
        ) from exc


def _write_config(model_dir: Path, config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _save_onnx(model: Any, model_dir: Path, version: int = 1) -> Path:
    import onnx

    onnx.checker.check_model(model)
    # skl2onnx emits opset imports in set order: sort them so rebuilds are byte-identical.
    imports = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in imports)
    path = model_dir / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


# --- tabular: gradient-boosted trees on the bundled breast-cancer data ---------------------


def build_tabular(dest: Path) -> str:
    _require_build_deps()
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier

    data = load_breast_cancer()
    x, y = data.data, data.target
    x = x.astype(np.float32)  # train on what ORT will see, so thresholds match exactly
    clf = GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=0).fit(x, y)
    # zipmap off: plain `label` INT64 [N] and `probabilities` FP32 [N, 2] tensors.
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, x.shape[1]]))],  # dynamic batch
        options={id(clf): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
        name="tabular",
    )
    model.ir_version = IR_VERSION
    model_dir = dest / "tabular"
    _save_onnx(model, model_dir)
    # Class labels for the classification extension, in a file as Triton's label_filename.
    (model_dir / "labels.txt").write_text("".join(f"{name}\n" for name in data.target_names))
    _write_config(model_dir, {"max_batch_size": 64, "max_batch_delay_ms": 2.0, "batching": True,
                              "labels": {"probabilities": "labels.txt"}})  # fmt: skip
    return "tabular"


# --- text: WordPiece tokenizer + a tiny untrained encoder ----------------------------------


def _corpus() -> list[str]:
    """Docstrings in a fixed order: the same Python version yields the same corpus."""
    docs: list[str] = []
    with warnings.catch_warnings():  # getattr on deprecated aliases (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for mod_name in CORPUS_MODULES:
            docs.extend(_module_docs(mod_name))
    return [d for d in docs if d]


def _module_docs(mod_name: str) -> list[str]:
    """The module's docstring, then those of its public classes/functions, by name."""
    try:
        module = importlib.import_module(mod_name)
    except ImportError:  # e.g. a Python built without sqlite3: fewer docs, still fine
        return []
    objs = [getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")]
    own = [obj for obj in objs if getattr(obj, "__module__", None) == mod_name]
    return [inspect.getdoc(obj) or "" for obj in [module, *own]]


def _base_tokenizer(vocab: dict[str, int] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + punctuation
    tok.decoder = decoders.WordPiece()
    return tok


def _train_vocab(corpus: list[str]) -> dict[str, int]:
    from tokenizers import trainers

    tok = _base_tokenizer()
    # The trainer numbers '##c' tokens in Rust HashMap order (random per process) and breaks
    # ties between equally frequent merges by id, so the learnt set varied between builds.
    # Declaring every '##c' up front gives them fixed ids: same corpus, same vocabulary.
    chars: set[str] = set()
    for doc in corpus:
        words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(doc))
        chars.update(c for word, _ in words for c in word[1:])
    pinned = [f"##{c}" for c in sorted(chars)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[*SPECIAL_TOKENS, *pinned], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    rest = sorted(set(tok.get_vocab()) - set(SPECIAL_TOKENS))  # [PAD] = 0, ..., then sorted
    return {t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])}


def _train_tokenizer() -> Any:
    from tokenizers.processors import TemplateProcessing

    tok = _base_tokenizer(_train_vocab(_corpus()))
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocab: keeps their ids
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return tok  # no padding/truncation in the file: the runtime pre-processor does both


def _encoder(vocab_size: int) -> Any:
    """Token + position embeddings -> Dense -> Tanh, zeroed where attention_mask == 0.

    Every op is per position (no attention), so a row's hidden states do not depend on
    the other rows of a batch or on how much padding follows it.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "tok_emb": rng.normal(0, 0.5, (vocab_size, HIDDEN)),
        "pos_emb": rng.normal(0, 0.1, (MAX_POSITIONS, HIDDEN)),
        "dense_w": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, HIDDEN)),
        "dense_b": rng.normal(0, 0.1, (HIDDEN,)),
    }
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    inits += [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in {"zero": [0], "one": [1], "two": [2], "last": [-1]}.items()
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["tok_emb", "input_ids"], ["tok"], axis=0),  # [B, S, H]
        node("Shape", ["input_ids"], ["ids_shape"]),
        node("Slice", ["ids_shape", "one", "two"], ["seq_len"]),  # [S]
        node("Slice", ["pos_emb", "zero", "seq_len", "zero"], ["pos"]),  # [S, H]
        node("Add", ["tok", "pos"], ["emb"]),
        node("MatMul", ["emb", "dense_w"], ["proj"]),
        node("Add", ["proj", "dense_b"], ["pre_act"]),
        node("Tanh", ["pre_act"], ["act"]),
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),  # [B, S, 1]
        node("Mul", ["act", "mask_3d"], ["last_hidden_state"]),
    ]
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims),
        ],
        outputs=[
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, HIDDEN])
        ],
        initializer=inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=IR_VERSION,
        producer_name="podserve.demo_models",
    )


def build_text(dest: Path) -> str:
    _require_build_deps()
    model_dir = dest / "text"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    _save_onnx(_encoder(tok.get_vocab_size()), model_dir)
    _write_config(
        model_dir,
        {
            "max_batch_size": 32,
            "max_batch_delay_ms": 2.0,
            "batching": True,
            "preprocessor": {
                "name": "tokenizer",
                "options": {
                    "tokenizer_file": "tokenizer.json",
                    "max_length": MAX_POSITIONS,
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
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, HIDDEN]}],
        },
    )
    return "text"


def build_demo_repository(dest: Path) -> list[str]:
    """Write both demo models under ``dest``; returns the model names written."""
    _require_build_deps()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return [build_tabular(dest), build_text(dest)]
