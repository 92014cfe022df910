"""The cyclic garbage collector, tuned for a server whose heap is built once at start-up.

Measured on the tabular model at ~5k requests/s per worker with Python's thresholds
(700/10/10), in some workers (about one in two; the others hardly collected): ~140
young-generation collections a second and a full collection every ~1.3 s that walked the
~80k objects FastAPI, pydantic, numpy and ONNX Runtime's bindings leave on the heap, each
stopping the event loop for up to 35 ms (4-5% of that worker's CPU all told). Refcounting
frees what a request allocates (under load, DEBUG_SAVEALL found no cyclic garbage), so:

- freeze: once the models and the app are loaded, move every object into the permanent
  generation, which no collection walks again (CPython's `gc.freeze`, meant for this);
- a higher young-generation threshold: collections under load become rare (none in
  15 s at 10,000 here), and cyclic garbage, rare here, waits a little longer to be freed.

Throughput did not change measurably (interleaved A/B, docs/performance.md); what this
removes is the pauses.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def tune_collector(gen0_threshold: int, freeze: bool) -> None:
    """Call once the worker has loaded everything it keeps (models, app, clients)."""
    if freeze:
        gc.collect()  # what is garbage now must not be frozen
        gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info(
        "garbage collector tuned",
        extra={"frozen_objects": gc.get_freeze_count(), "thresholds": list(gc.get_threshold())},
    )
