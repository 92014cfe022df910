"""Gunicorn configuration, derived from Settings.

Usable directly: `gunicorn -c python:podserve.gunicorn_conf 'podserve.app:create_app()'`;
`podserve serve` loads the same values.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from podserve import (
    batching_demotion,
    bind_check,
    connection_balance,
    deferred_listen,
    log_control,
    malloc_tuning,
    model_trace_settings,
    pod_settings,
    repository_fingerprint,
    slot_listeners,
    startup_failure,
    trace_control,
)
from podserve.logs import gunicorn_logconfig_dict
from podserve.runtime import resolve_workers, thread_oversubscription
from podserve.settings import (
    Settings,
    get_settings,
    host_resolution_problem,
    report_invalid,
    unknown_settings,
)


def config_dict(settings: Settings) -> dict[str, Any]:
    workers = resolve_workers(settings)  # reads the cgroup quota: once
    return {
        "bind": [bind_check.host_port(_resolvable_host(settings.host), settings.port)],
        "workers": workers,
        "worker_class": "podserve.worker.PodserveWorker",
        # One SO_REUSEPORT socket per worker spreads connections evenly. A lone worker gets
        # none: it serves the master's socket, which outlives it, so while a recycled worker
        # is replaced connections wait in the queue instead of being refused.
        "reuse_port": workers > 1,
        "preload_app": False,  # ORT sessions and threads must be created after fork
        "graceful_timeout": math.ceil(settings.graceful_timeout_s),
        "timeout": math.ceil(settings.worker_timeout_s),
        "keepalive": math.ceil(settings.keepalive_s),
        "max_requests": settings.max_requests,
        "max_requests_jitter": settings.max_requests // 10,
        "backlog": 2048,
        "accesslog": "-" if settings.access_log else None,
        "logconfig_dict": gunicorn_logconfig_dict(settings.log_level, settings.access_log),
        "proc_name": "podserve",
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        **_optional_settings(),
        # The bind check before anything is set up (only the warnings of unknown settings
        # and of thread oversubscription come before it): a busy port stops the master there.
        **chain_hooks(
            {"on_starting": _warn_unknown_settings},
            malloc_tuning.gunicorn_hooks(settings.malloc_mmap_threshold_bytes),  # before fork
            _thread_hooks(settings, workers),
            bind_check.gunicorn_hooks(),
            startup_failure.gunicorn_hooks(),  # workers failing to boot: one halt, exit 3
            deferred_listen.gunicorn_hooks() if settings.defer_listen else {},
            _metrics_hooks(settings),
            # The shared table of per-worker connection counts and states (counted for the
            # metrics even with PODSERVE_BALANCE_CONNECTIONS=false).
            connection_balance.gunicorn_hooks(workers),
            slot_listeners.gunicorn_hooks(workers),  # after the slots are claimed / released
            pod_settings.gunicorn_hooks(
                batching_demotion.POD_SETTING,
                log_control.POD_SETTING,
                trace_control.POD_SETTING,
                model_trace_settings.POD_SETTING,
            ),
            trace_control.gunicorn_hooks(),
            batching_demotion.gunicorn_hooks(),
            repository_fingerprint.gunicorn_hooks(settings.model_repository),
        ),
    }


def chain_hooks(*hook_sets: dict[str, Any]) -> dict[str, Any]:
    """One Gunicorn hook per name, calling each set's hook of that name in order."""
    grouped: dict[str, list[Callable[..., None]]] = {}
    for hooks in hook_sets:
        for name, hook in hooks.items():
            grouped.setdefault(name, []).append(hook)
    return {
        name: calls[0] if len(calls) == 1 else _chained(calls) for name, calls in grouped.items()
    }


def _chained(calls: list[Callable[..., None]]) -> Callable[..., None]:
    """Gunicorn checks a hook's arity (server), (server, worker) or (server, new, old):
    no *args wrapper."""
    arity = len(inspect.signature(calls[0]).parameters)
    if arity == 1:

        def on_server(server: Any) -> None:
            for call in calls:
                call(server)

        return on_server
    if arity == 3:

        def on_change(server: Any, new_value: Any, old_value: Any) -> None:
            for call in calls:
                call(server, new_value, old_value)

        return on_change

    def on_worker(server: Any, worker: Any) -> None:
        for call in calls:
            call(server, worker)

    return on_worker


def _warn_unknown_settings(server: Any) -> None:
    for name in unknown_settings(os.environ):
        server.log.warning("unknown setting ignored: %s", name)


def _resolvable_host(host: str) -> str:
    """A host name that does not resolve stops the start here, naming the setting: Gunicorn
    retried its bind 5 times (~6 s), then named neither the setting nor the cause."""
    problem = host_resolution_problem(host)
    if problem:
        print(f"error: PODSERVE_HOST={host!r}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return host


def _thread_hooks(settings: Settings, workers: int) -> dict[str, Any]:
    """on_starting: one warning when the inference threads outnumber the quota's CPUs (they
    then preempt each other, and every batch runs slower)."""
    counts = thread_oversubscription(settings, workers)
    if counts is None:
        return {}
    message = (
        "inference threads oversubscribe the CPU quota: {workers} workers (PODSERVE_WORKERS) "
        "x {pool_threads} pool threads (PODSERVE_POOL_THREADS) x {intra_op_threads} ORT "
        "intra-op threads (PODSERVE_ORT_INTRA_OP_THREADS) = {threads} threads for {cpus} CPUs"
    ).format(**counts)

    def on_starting(server: Any) -> None:
        server.log.warning(message, extra=counts)

    return {"on_starting": on_starting}


def _metrics_hooks(settings: Settings) -> dict[str, Any]:
    """on_starting / child_exit / on_exit: the per-pod multiprocess metrics directory."""
    if not settings.metrics_enabled:
        return {}
    from podserve.metrics_multiprocess import gunicorn_hooks

    return gunicorn_hooks(settings.prometheus_multiproc_dir)


def _optional_settings() -> dict[str, Any]:
    """Settings of newer Gunicorn releases, applied only where they exist."""
    from gunicorn.config import KNOWN_SETTINGS

    known = {setting.name for setting in KNOWN_SETTINGS}
    # The control socket (Gunicorn >= 25.1) writes under $HOME: not on a read-only root FS.
    return {"control_socket_disable": True} if "control_socket_disable" in known else {}


def _settings_or_exit() -> Settings:
    """`gunicorn -c python:podserve.gunicorn_conf` imports this module itself, outside
    `podserve serve`'s handler: a bad setting is one line each, not Gunicorn's traceback."""
    try:
        return get_settings()
    except ValidationError as exc:
        raise SystemExit(report_invalid(exc)) from None


globals().update(config_dict(_settings_or_exit()))
