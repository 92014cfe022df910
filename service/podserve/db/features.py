"""Feature lookup: requests send entity ids, the server fetches the vectors and builds the tensor.

All rows of a request come from one query (`entity_id = ANY($2)`). An optional bounded
in-process TTL cache saves the round trip for hot entities, and concurrent requests for the
same entity share one query (a hot entity's burst, or its cache entry expiring, would
otherwise take every pool connection and queue the rest). Time budget: connection plus
query within PODSERVE_FEATURES_TIMEOUT_S, or within what is left of the request's deadline
(X-Podserve-Timeout-Ms, PODSERVE_REQUEST_TIMEOUT_MS) when that is sooner; a slow query is a
504, a database that is down a 503, none configured a 501.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from podserve.db.pool import Database, deadline_exceeded
from podserve.errors import (
    BadRequest,
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from podserve.metrics import DB_POOL_WAIT_BUCKETS, ObservationTally
from podserve.model_config import TensorSpec
from podserve.onnx_model import OnnxModel
from podserve.processors import Tensors
from podserve.settings import Settings

FETCH_SQL = (
    'SELECT entity_id, "values" FROM podserve_features '
    "WHERE feature_set = $1 AND entity_id = ANY($2::text[])"
)
MAX_LISTED = 50  # unknown ids named in a 404
# A shared lookup's answer for an id that it could not give (it failed, or its request was
# cancelled): each request waiting on it then queries for that id itself, within its own budget.
_ASK_AGAIN = object()
SCHEMA_MISSING = "database schema is missing: run `podserve db migrate`"


def schema_missing(retry_after_s: int) -> ServiceUnavailable:
    """The 503 of a request whose table is not there (UndefinedTableError): the database was
    never migrated, or not yet (a migration hook that runs as the pods start). Not a 500 and
    its traceback: the operator's fix is the message, and the request can be retried."""
    return ServiceUnavailable(SCHEMA_MISSING, {"Retry-After": str(retry_after_s)})


@dataclass(frozen=True)
class EntityLookup:
    entity_ids: list[str]
    feature_set: str | None


def entity_lookup(doc: Any, has_inputs: bool) -> EntityLookup | None:
    """`{"entity_ids": [...], "feature_set": "..."}` (V2 parameters or a V1 body), else None."""
    if not isinstance(doc, Mapping) or "entity_ids" not in doc:
        return None
    if has_inputs:
        raise BadRequest("send either tensors or 'entity_ids', not both")
    ids = doc["entity_ids"]
    if not isinstance(ids, list) or not ids:
        raise BadRequest("'entity_ids' must be a non-empty list of strings or integers")
    if not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
        raise BadRequest("'entity_ids' must hold only strings or integers")
    feature_set = doc.get("feature_set")
    if feature_set is not None and (not isinstance(feature_set, str) or not feature_set):
        raise BadRequest("'feature_set' must be a non-empty string")
    entity_ids = [str(i) for i in ids]
    # PostgreSQL text cannot hold U+0000: no stored id or set has one, and the driver would
    # refuse the query (a 500) instead of finding nothing.
    if feature_set is not None and "\x00" in feature_set:
        raise BadRequest("'feature_set' must not contain the character U+0000")
    if any("\x00" in i for i in entity_ids):
        raise BadRequest("'entity_ids' must not contain the character U+0000")
    return EntityLookup(entity_ids, feature_set)


def feature_input(model: OnnxModel) -> TensorSpec:
    """The model's single FP32 [n, width] input that feature vectors fill."""
    inputs = model.inputs
    if len(inputs) != 1 or inputs[0].datatype != "FP32" or len(inputs[0].shape) != 2:
        raise BadRequest(
            f"model '{model.name}' cannot take entity ids: that needs a single FP32 "
            "[batch, width] input"
        )
    return inputs[0]


def checked_lookup(model: OnnxModel, lookup: EntityLookup) -> TensorSpec:
    """The input a lookup fills, after the checks that need no I/O (online, and for a job
    when it is submitted: a job that would fail is the client's 4xx then, not later)."""
    spec = feature_input(model)
    if len(lookup.entity_ids) > model.max_rows_per_request:
        raise PayloadTooLarge(
            f"{len(lookup.entity_ids)} entity ids exceed the limit of {model.max_rows_per_request}"
        )
    return spec


class TtlCache:
    """Bounded LRU with a time-to-live: feature rows change, so stale entries expire."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[tuple[str, str], tuple[float, np.ndarray]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class FeatureStore:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.timeout_s = settings.features_timeout_s
        self.timeout_message = (
            f"feature lookup took longer than {self.timeout_s:g} s (PODSERVE_FEATURES_TIMEOUT_S)"
        )
        size = settings.features_cache_size
        self.cache = TtlCache(size, settings.features_cache_ttl_s) if size > 0 else None
        self.queries = 0  # round trips to PostgreSQL (the cache and shared lookups save some)
        self.shared = 0  # ids a request took from another request's query in flight
        # Each wait on another request's query in flight (podserve_feature_shared_wait_seconds):
        # neither a pool wait nor a query of its own, a slow `features` phase would hide it.
        # The pool wait's buckets, so that the two compare.
        self.shared_waits = ObservationTally(DB_POOL_WAIT_BUCKETS)
        self.retry_after_s = settings.retry_after_s
        # (feature set, entity id) -> the answer of the query in flight that fetches it: a
        # vector, None (no such entity) or _ASK_AGAIN. Bounded by the ids of requests in flight.
        self._in_flight: dict[tuple[str, str], asyncio.Future[object]] = {}

    async def tensor(
        self, model: OnnxModel, lookup: EntityLookup, deadline: float | None = None
    ) -> Tensors:
        """`deadline`: the request's, in time.perf_counter() seconds (None: none)."""
        spec = checked_lookup(model, lookup)
        ids = lookup.entity_ids
        feature_set = lookup.feature_set or model.name
        found = await self.vectors(feature_set, list(dict.fromkeys(ids)), deadline)
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing:
            listed = ", ".join(repr(i) for i in missing[:MAX_LISTED])
            more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise NotFound(
                f"unknown entity ids in feature set '{feature_set}' ({len(missing)} of "
                f"{len(set(ids))}): [{listed}]{more}"
            )
        return {spec.name: _assemble(feature_set, spec, [found[i] for i in ids])}

    async def vectors(
        self, feature_set: str, ids: list[str], deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        wanted = ids
        if self.cache is not None:
            wanted = []
            for entity in ids:
                hit = self.cache.get((feature_set, entity))
                if hit is None:
                    wanted.append(entity)
                else:
                    found[entity] = hit
        if not wanted:
            return found
        now = time.perf_counter()
        budget, message, by_request = self._budget(now, deadline)
        until = now + budget
        # Ids whose leader failed or gave up (its own short deadline) are shared again: the
        # first follower to wake leads them, the others follow it (querying each on its own
        # brought back the stampede: 168 of 200 answered 503 behind a 0.2 s leader).
        while wanted:
            theirs = {i: f for i in wanted if (f := self._in_flight.get((feature_set, i)))}
            mine = [i for i in wanted if i not in theirs]
            if mine:
                found.update(await self._lead(feature_set, mine, until, message, by_request))
            wanted = await self._follow(theirs, found, until, message, by_request) if theirs else []
        return found

    async def _lead(
        self, feature_set: str, ids: list[str], until: float, message: str, by_request: bool
    ) -> dict[str, np.ndarray]:
        """Query for `ids`, and give the answer to the requests that want them meanwhile."""
        loop = asyncio.get_running_loop()
        shared = {i: loop.create_future() for i in ids}
        self._in_flight.update(((feature_set, i), f) for i, f in shared.items())
        rows: dict[str, np.ndarray] = {}
        answered = False
        try:
            rows = await self._fetch(feature_set, ids, until, message, by_request)
            answered = True
            if self.cache is not None:
                for entity, vector in rows.items():
                    self.cache.put((feature_set, entity), vector)
        finally:  # on a failure or cancellation the followers ask again themselves
            for entity, future in shared.items():
                del self._in_flight[(feature_set, entity)]
                future.set_result(rows.get(entity) if answered else _ASK_AGAIN)
        return rows

    async def _follow(
        self,
        theirs: dict[str, asyncio.Future[object]],
        found: dict[str, np.ndarray],
        until: float,
        message: str,
        by_request: bool,
    ) -> list[str]:
        """Wait, within this request's own budget, for the queries in flight that fetch
        `theirs`; their vectors go into `found`. The ids to query again (their query failed)."""
        futures = set(theirs.values())
        started = time.perf_counter()
        try:
            _, pending = await asyncio.wait(futures, timeout=max(0.0, until - started))
        finally:  # a wait given up (504) or cancelled (client gone) took its time too
            self.shared_waits.observe(time.perf_counter() - started)
        if pending:  # never cancelled here: the query is the other request's
            raise deadline_exceeded(message, None if by_request else self._retry())
        again = []
        for entity, future in theirs.items():
            answer = future.result()
            if answer is _ASK_AGAIN:
                again.append(entity)
            elif isinstance(answer, np.ndarray):
                found[entity] = answer
                self.shared += 1
        return again

    async def _fetch(
        self, feature_set: str, ids: list[str], until: float, message: str, by_request: bool
    ) -> dict[str, np.ndarray]:
        budget = until - time.perf_counter()
        if budget <= 0:
            raise deadline_exceeded(message, None if by_request else self._retry())
        self.queries += 1
        try:
            async with self.db.connection(budget, message, request_deadline=by_request) as conn:
                remaining = max(0.001, until - time.perf_counter())
                rows = await conn.fetch(FETCH_SQL, feature_set, ids, timeout=remaining)
        except asyncpg.UndefinedTableError:
            raise schema_missing(self.retry_after_s) from None
        return {row["entity_id"]: np.asarray(row["values"], np.float32) for row in rows}

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def _budget(self, now: float, deadline: float | None) -> tuple[float, str, bool]:
        """(seconds for connection and query, the 504's message, whether they are the rest of
        the request's deadline): PODSERVE_FEATURES_TIMEOUT_S, or the deadline when sooner."""
        if deadline is None or deadline - now >= self.timeout_s:
            return self.timeout_s, self.timeout_message, False
        left = deadline - now
        if left <= 0:  # nothing left to wait with: no round trip for an answer nobody reads
            raise DeadlineExceeded("request deadline exceeded before the feature lookup")
        message = (
            f"feature lookup took longer than the {left * 1000:.0f} ms left of the request "
            "deadline (X-Podserve-Timeout-Ms or PODSERVE_REQUEST_TIMEOUT_MS)"
        )
        return left, message, True


def _assemble(feature_set: str, spec: TensorSpec, vectors: list[np.ndarray]) -> np.ndarray:
    widths = {len(v) for v in vectors}
    if len(widths) != 1:
        raise BadRequest(f"feature set '{feature_set}' has rows of different widths {widths}")
    width = widths.pop()
    if spec.shape[1] >= 0 and width != spec.shape[1]:
        raise BadRequest(
            f"feature set '{feature_set}' has width {width}; input '{spec.name}' "
            f"expects {spec.shape[1]}"
        )
    return np.stack(vectors).astype(np.float32, copy=False)
