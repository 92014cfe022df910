"""Per-model trace settings: Triton's `GET`/`POST /v2/models/{name}/trace/setting`.

A model's settings override the pod's (trace_control.py) field by field, for that model's
inference requests (V2 infer, V1 predict): `{"trace_rate": "1", "trace_count": "50"}` on
one model traces its next 50 requests while the rest of the pod keeps one in a thousand.
Fields the model does not set follow the pod's, now and after later pod changes; a JSON
null clears a field (the model follows the pod's again), and a model with no field left
has no entry. `trace_count` set on a model is that model's own count; otherwise its
requests draw on the pod's.

The overrides are one table in the pod's shared memory (pod_settings.py), so every worker
samples alike: MAX_MODELS entries of ENTRY words, each keyed by a 64-bit hash of the model
name (names are not stored). A worker rebuilds its snapshot of the table when it changes
(at once for its own POSTs, within half a second for the others'); a model's count is read
and spent in the shared table itself, under its lock, once per trace started.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry.sdk.trace.sampling import Sampler
from starlette.routing import compile_path

from podserve import pod_settings, trace_control
from podserve.errors import BadRequest
from podserve.model_statistics import INFERENCE_ROUTES
from podserve.trace_control import UNLIMITED, TraceSettings

MAX_MODELS = 64
# Words of one entry: the name's hash (two words), which fields the model sets, then those.
KEY_HIGH, KEY_LOW, FIELDS, ON, TENSORS, RATE, COUNT = range(7)
ENTRY = 7
LEVEL_SET, RATE_SET, COUNT_SET = 1, 2, 4  # bits of FIELDS

log = logging.getLogger(__name__)
Words = tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def model_key(name: str) -> tuple[int, int]:
    """The model name's 64-bit hash as two signed 32-bit words, never (0, 0) (a free entry);
    stable across processes, unlike hash()."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    high, low = (int.from_bytes(digest[i : i + 4], "little", signed=True) for i in (0, 4))
    return (high, low) if (high, low) != (0, 0) else (0, 1)


@dataclass(frozen=True)
class ModelOverride:
    """One model's entry: the fields it sets (bits of `fields`) and their values."""

    slot: int
    key: tuple[int, int]
    fields: int
    on: bool = False
    tensors: bool = False
    rate: int = 1

    def over(self, pod: TraceSettings) -> TraceSettings:
        """The model's settings: its own fields, the pod's for the rest."""
        settings = pod
        if self.fields & LEVEL_SET:
            settings = replace(settings, on=self.on, tensors=self.tensors)
        if self.fields & RATE_SET:
            settings = replace(settings, rate=self.rate)
        return settings

    def sampler(self) -> Sampler:
        return _sampler(self.over(trace_control.current()))

    def remaining(self) -> int:
        """The model's own count if it sets one, else the pod's."""
        own = self._own_count(POD_SETTING.shared.read()[1])
        return trace_control.budget().remaining() if own is None else own

    def admits(self) -> bool:
        """May a trace of this model's inference request start? Spends one of its count (a
        lock once per trace started), or of the pod's if it has none."""
        own = self._own_count(POD_SETTING.shared.read()[1])
        if own == UNLIMITED:
            return True
        if own is not None:
            _, old = POD_SETTING.shared.update(self._spend_one)
            own = self._own_count(old)  # what it was when spent, under the lock
        if own is None:
            return trace_control.budget().take()
        if own == 1:
            log.info(
                "a model's trace_count is spent: its inference requests start no trace until "
                "POST /v2/models/{name}/trace/setting"
            )
        return own != 0

    def _own_count(self, values: Words) -> int | None:
        """The model's count in the live table; None if it has none (or since this snapshot
        its entry lost it or was cleared)."""
        if not self.fields & COUNT_SET:
            return None
        entry = values[self.slot * ENTRY : (self.slot + 1) * ENTRY]
        if (entry[KEY_HIGH], entry[KEY_LOW]) != self.key or not entry[FIELDS] & COUNT_SET:
            return None
        return entry[COUNT]

    def _spend_one(self, values: Words) -> Words:
        own = self._own_count(values)
        if own is None or own <= 0:
            return values
        at = self.slot * ENTRY + COUNT
        return (*values[:at], own - 1, *values[at + 1 :])


@functools.lru_cache(maxsize=256)
def _sampler(settings: TraceSettings) -> Sampler:
    return settings.sampler()


class _Snapshot:
    """This process's view of the table: model key -> its override."""

    by_key: dict[tuple[int, int], ModelOverride] = {}


def _override_of(slot: int, entry: Words) -> ModelOverride | None:
    """An entry's words as an override (None: a free entry)."""
    if not entry[FIELDS]:
        return None
    key = (entry[KEY_HIGH], entry[KEY_LOW])
    return ModelOverride(
        slot, key, entry[FIELDS], bool(entry[ON]), bool(entry[TENSORS]), entry[RATE]
    )


def _entries(values: Words) -> dict[tuple[int, int], ModelOverride]:
    entries = {}
    for slot in range(MAX_MODELS):
        found = _override_of(slot, values[slot * ENTRY : (slot + 1) * ENTRY])
        if found is not None:
            entries[found.key] = found
    return entries


def _apply_table(values: tuple[int, ...]) -> None:
    _Snapshot.by_key = _entries(values)


POD_SETTING = pod_settings.register("model-trace-settings", MAX_MODELS * ENTRY, _apply_table)


def override(model: str) -> ModelOverride | None:
    return _Snapshot.by_key.get(model_key(model)) if _Snapshot.by_key else None


def settings_for(model: str) -> TraceSettings:
    """The settings a model's requests are traced with."""
    found = override(model)
    pod = trace_control.current()
    return pod if found is None else found.over(pod)


def as_triton(model: str) -> dict[str, Any]:
    found = override(model)
    count = trace_control.budget().remaining() if found is None else found.remaining()
    return settings_for(model).as_triton(count)


@functools.lru_cache(maxsize=16)
def _route_pattern(route: str) -> re.Pattern[str]:
    return compile_path(route)[0]  # the regex Starlette routes this template with


def model_in_path(route: str, path: str) -> str | None:
    """The model an inference request names (the route is its template), else None."""
    if route not in INFERENCE_ROUTES:
        return None
    match = _route_pattern(route).match(path)
    return match["model_name"] if match else None


def for_request(route: str, attributes: Mapping[str, Any] | None) -> ModelOverride | None:
    """The sampler's question: does this request's model have settings of its own? Costs a
    truth test unless some model has."""
    if not _Snapshot.by_key or not attributes:
        return None
    path = attributes.get("url.path") or attributes.get("http.target")
    if not isinstance(path, str):
        return None
    model = model_in_path(route, path.partition("?")[0])
    return override(model) if model else None


# --- changes ------------------------------------------------------------------------------
def _store_level(entry: list[int], value: Any) -> None:
    on, tensors = trace_control.parse_level(value)
    entry[ON], entry[TENSORS] = int(on), int(tensors and on)


def _store_rate(entry: list[int], value: Any) -> None:
    entry[RATE] = trace_control.parse_rate(value)


def _store_count(entry: list[int], value: Any) -> None:
    entry[COUNT] = trace_control.parse_count(value)


_STORE = {
    "trace_level": (LEVEL_SET, _store_level),
    "trace_rate": (RATE_SET, _store_rate),
    "trace_count": (COUNT_SET, _store_count),
}


def _edit_entry(entry: list[int], request: dict[str, Any]) -> None:
    """Apply a POST body to one entry's words; null clears a field."""
    for name, (bit, store) in _STORE.items():
        if name not in request:
            continue
        if request[name] is None:
            entry[FIELDS] &= ~bit
        else:
            entry[FIELDS] |= bit
            store(entry, request[name])


def _fresh_entry(key: tuple[int, int]) -> list[int]:
    """A model's entry before any field is set (the values are the unset fields' defaults)."""
    return [*key, 0, 0, 0, 1, UNLIMITED]


def _slot_for(values: tuple[int, ...], key: tuple[int, int]) -> int | None:
    """The model's entry, else a free one, else None (the table is full)."""
    free = None
    for slot in range(MAX_MODELS):
        base = slot * ENTRY
        if values[base + FIELDS] and (values[base + KEY_HIGH], values[base + KEY_LOW]) == key:
            return slot
        if free is None and not values[base + FIELDS]:
            free = slot
    return free


def _table_edit(key: tuple[int, int], request: dict[str, Any]) -> Callable[[Words], Words]:
    def edit(values: Words) -> Words:
        slot = _slot_for(values, key)
        if slot is None:
            raise BadRequest(
                f"at most {MAX_MODELS} models can have trace settings of their own; "
                "clear another model's with null values first"
            )
        base = slot * ENTRY
        entry = list(values[base : base + ENTRY])
        if not entry[FIELDS]:
            entry = _fresh_entry(key)
        _edit_entry(entry, request)
        if not entry[FIELDS]:
            entry = [0] * ENTRY  # nothing of its own left: the entry is free again
        return (*values[:base], *entry, *values[base + ENTRY :])

    return edit


def change(model: str, request: Any) -> dict[str, Any]:
    """A POST body for one model: validate, store for the pod, answer its settings."""
    request = trace_control.checked_request(request)
    before = settings_for(model)
    probe = _fresh_entry(model_key(model))
    _edit_entry(probe, request)  # validates before anything is stored
    if not trace_control.tracing_set_up():
        after = _override_of(0, tuple(probe))
        sets_count = request.get("trace_count") not in (None, str(UNLIMITED), UNLIMITED)
        if sets_count or (after is not None and after.over(before) != before):
            raise trace_control.not_set_up()
    POD_SETTING.edit(_table_edit(model_key(model), request))
    return as_triton(model)
