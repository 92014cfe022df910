"""A model's batching, turned off at run time, stays off in every worker of the pod.

A merged run can show that a model's output has no row per input row (a data-dependent
count the warm-up's dummy rows did not show): the worker that sees it stops batching the
model (onnx_model.py, batcher.py) and writes it to a table in the pod's shared memory
(pod_settings.py). The other workers follow within half a second, a worker started later (a
recycle, a crash) at its first look, so `/v2/models/<m>/config` answers alike on every
connection. A demotion holds until the pod restarts.

The table holds MAX_MODELS entries, each a 64-bit hash of the model's name, version and file
(names are not stored). Once it is full, a further demotion stays the worker's own (logged).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from podserve import pod_settings

if TYPE_CHECKING:
    from podserve.onnx_model import OnnxModel

MAX_MODELS = 256  # demotions are rare (each one a model whose config should say batching: false)
ENTRY = 2  # an entry's words: the key; (0, 0) is a free entry

log = logging.getLogger(__name__)
Key = tuple[int, int]
Words = tuple[int, ...]


def model_key(model: OnnxModel) -> Key:
    """Two signed 32-bit words, never (0, 0), stable across processes (unlike hash()). The
    file too, not only name and version: apps run one after another in one process (tests)
    serve other files under the same names."""
    identity = f"{model.name}\0{model.version}\0{model.path}".encode()
    digest = hashlib.blake2b(identity, digest_size=8).digest()
    high, low = (int.from_bytes(digest[i : i + 4], "little", signed=True) for i in (0, 4))
    return (high, low) if (high, low) != (0, 0) else (0, 1)


def _keys(values: Words) -> frozenset[Key]:
    entries = ((values[at], values[at + 1]) for at in range(0, len(values), ENTRY))
    return frozenset(key for key in entries if key != (0, 0))


# The models this process serves (held weakly: a stopped app's are not kept alive).
_served: weakref.WeakSet[OnnxModel] = weakref.WeakSet()


def _apply_table(values: Words) -> None:
    demoted = _keys(values)
    if not demoted:
        return
    for model in list(_served):
        if model.batching and model_key(model) in demoted:
            model.batching = False
            log.info(
                "batching turned off: another worker of the pod saw the model's outputs "
                "without a row per input row",
                extra={"model": model.name, "version": model.version},
            )


# The Gunicorn master maps its words before it forks (gunicorn_conf: pod_settings' hooks).
POD_SETTING = pod_settings.register("batching-demotion", MAX_MODELS * ENTRY, _apply_table)
# Demotions come from pool threads (onnx_model) and the event loop (batcher): the memory
# file's record lock serialises processes, not the threads of one.
_WRITING = threading.Lock()


def gunicorn_hooks() -> dict[str, Any]:
    """on_reload (HUP): the new workers may serve other files at the same paths (the
    repository is read again), so the pod forgets its demotions, as a restart would."""

    def on_reload(_server: Any) -> None:
        POD_SETTING.shared.update(lambda values: (0,) * len(values))

    return {"on_reload": on_reload}


def serve(models: Iterable[OnnxModel]) -> None:
    """The models this process serves from now on (an app's, once loaded): the pod's
    demotions apply to them now, later ones at the pod-settings follower's looks."""
    _served.update(models)
    _apply_table(POD_SETTING.shared.read()[1])


def publish(model: OnnxModel) -> None:
    """Called where this worker has just turned the model's batching off: the pod's other
    workers follow (they apply the table on the event loop; this may run on a pool thread)."""
    try:
        with _WRITING:
            POD_SETTING.shared.update(_adding(model_key(model)))
    except _TableFull:
        log.warning(
            "batching demotions table full: the pod's other workers keep batching the model",
            extra={"model": model.name, "version": model.version, "max_models": MAX_MODELS},
        )


class _TableFull(Exception):
    pass


def _adding(key: Key) -> Callable[[Words], Words]:
    def edit(values: Words) -> Words:
        if key in _keys(values):
            return values
        for at in range(0, len(values), ENTRY):
            if (values[at], values[at + 1]) == (0, 0):
                return (*values[:at], *key, *values[at + ENTRY :])
        raise _TableFull

    return edit
