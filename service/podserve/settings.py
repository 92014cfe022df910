"""The one settings object: every knob is an env var ``PODSERVE_<NAME>`` (see README)."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import socket
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from podserve.db.url_check import url_problem
from podserve.loop_watch import TICK_S
from podserve.model_config import MAX_BATCH_DELAY_MS

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# Five ticks: a late tick or two on a busy CPU is no stall (the other workers would take
# over the worker's connections), and the watchdog wakes at most 8 times a second.
MIN_LOOP_STALL_S = 5 * TICK_S
# Path("") is "." : a blank path setting meant the working directory (the metrics dir's
# clean-up deleted every *.db file there, the spool wrote its journal there).
_PATH_DEFAULTS = {
    "model_repository": "./model_repository",
    "spool_dir": "./spool",
    "prometheus_multiproc_dir": "a fresh temporary directory per server",
    "api_keys_file": "no key file",
}
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123


class Settings(BaseSettings):
    # No `inf`/`nan` anywhere: a float setting is a duration, a rate or a size, and an
    # infinite one failed later and elsewhere (an inf batch delay made the config route 500).
    model_config = SettingsConfigDict(env_prefix="PODSERVE_", extra="ignore", allow_inf_nan=False)

    # --- HTTP / Gunicorn -------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Whose X-Forwarded-For/-Proto are believed: any client's, with "*", could set the
    # address the access log shows and the scheme and host of redirects.
    forwarded_allow_ips: str = Field("127.0.0.1,::1", description="IPs/CIDRs, or *")
    workers: int | None = Field(None, ge=1, description="Gunicorn workers; default: CPU quota")
    graceful_timeout_s: float = Field(25.0, gt=0)
    drain_idle_grace_s: float = Field(
        0.5, ge=0, le=10, description="a draining worker's idle connections: time for a request"
    )
    worker_timeout_s: float = Field(60.0, gt=0)
    loop_stall_s: float = Field(
        2.0, ge=0, description="log the event loop's stack when it stalls this long; 0 = off"
    )
    keepalive_s: float = Field(75.0, gt=0, description="> typical LB idle timeout (60 s)")
    max_requests: int = Field(0, ge=0, description="recycle a worker after N requests; 0 = never")
    recycle_max_wait_s: float = Field(
        120.0, ge=1, description="a worker at its limit waits this long for the others to serve"
    )
    expose_worker_id: bool = False
    balance_connections: bool = Field(
        True, description="close surplus keep-alive connections of a worker above its share"
    )
    defer_listen: bool = Field(
        True, description="a worker's own socket listens only once its models are loaded"
    )
    docs_enabled: bool = True
    log_level: str = "info"
    access_log: bool = False
    allow_settings_changes: bool = Field(
        True,
        description="POST /v2/logging and /v2/[models/{name}/]trace/setting may change settings",
    )

    # --- Models and inference ------------------------------------------------------
    model_repository: Path = Path("./model_repository")
    pool_threads: int = Field(1, ge=1, description="inference threads per worker")
    inference_thread_nice: int = Field(10, ge=0, le=19, description="loop first on busy CPUs")
    inference_thread_idle: bool = Field(False, description="SCHED_IDLE: the loop preempts")
    thread_slice_us: float = Field(
        100, ge=0, le=100_000, description="threads' sched slice (Linux 6.12+); 0 = default"
    )
    gil_switch_interval_ms: float = Field(
        0.5, gt=0, le=100, description="how long the loop waits for the GIL at most (py: 5)"
    )
    ort_intra_op_threads: int | None = Field(None, ge=1, description="default: quota split")
    ort_inter_op_threads: int = Field(1, ge=1)
    ort_allow_spinning: bool = False
    ort_log_severity: int = Field(
        4, ge=0, le=4, description="ORT's plain-text stderr log: 0 verbose .. 3 errors, 4 off"
    )
    gc_freeze: bool = Field(True, description="freeze the start-up heap (see gc_tuning.py)")
    gc_gen0_threshold: int = Field(10_000, ge=0, description="0 = Python's default (700)")
    # glibc's M_MMAP_THRESHOLD (malloc_tuning.py); mallopt refuses more than 32 MiB on 64-bit.
    malloc_mmap_threshold_bytes: int = Field(
        1024 * 1024, ge=0, le=32 * 1024 * 1024, description="glibc; 0 = its default"
    )
    max_batch_size: int = Field(32, ge=1, description="default for models without config")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=MAX_BATCH_DELAY_MS, description="<= 60000")
    max_queue_rows: int = Field(256, ge=1, description="per-worker bound on queued rows")
    max_rows_per_request: int = Field(1024, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Request-body bytes one worker holds at once (read, and inflated); past it: 503 (http_body).
    max_body_bytes_in_flight: int = Field(
        0, ge=0, description="per worker; 0 = 4 x max_body_bytes; >= max_body_bytes"
    )
    body_read_timeout_s: float = Field(30.0, gt=0)
    header_read_timeout_s: float = Field(10.0, gt=0, description="slow-drip headers -> 408")
    max_header_bytes: int = Field(65536, ge=1024, description="larger headers -> 431")
    request_timeout_ms: float = Field(0.0, ge=0, description="deadline per request; 0 = none")
    allow_nonfinite: bool = False
    retry_after_s: int = Field(1, ge=1)
    # Answers compressed when the client asks (Accept-Encoding; response_compression.py).
    # Two knobs only: on/off, and the size below which compressing costs more CPU (~5-10 us
    # fixed) than the bytes it saves are worth; the level is fixed at zlib's 1 (measured).
    response_compression: bool = Field(True, description="gzip/deflate answers when asked")
    response_compression_min_bytes: int = Field(
        1024, ge=0, description="smaller answers are sent uncompressed"
    )

    # --- PostgreSQL (issue 3) ------------------------------------------------------
    database_url: SecretStr | None = None
    db_pool_min: int = Field(1, ge=0)
    db_pool_max: int = Field(4, ge=1)
    db_statement_cache_size: int = Field(256, ge=0)
    db_reset_sessions: bool = False  # asyncpg's reset query on every release (see db/pool.py)
    db_command_timeout_s: float = Field(2.0, gt=0)
    db_connect_timeout_s: float = Field(2.0, gt=0)
    # A transaction whose client went silent (its network path died) keeps its row locks
    # until PostgreSQL ends it; without a bound that is TCP keepalive, hours by default.
    db_idle_in_transaction_timeout_s: float = Field(5.0, gt=0)
    db_max_waiting: int = Field(32, ge=1, description="requests waiting for a connection, then 503")
    db_breaker_failures: int = Field(3, ge=1, description="failures that open the breaker")
    db_breaker_reset_s: float = Field(2.0, gt=0, description="fail fast this long, then probe")
    features_timeout_s: float = Field(1.0, gt=0, description="connection + query budget")
    features_cache_size: int = Field(0, ge=0, description="cached feature rows; 0 = no cache")
    features_cache_ttl_s: float = Field(60.0, gt=0)
    prediction_log: bool = True
    prediction_log_inputs: Literal["full", "digest"] = "digest"
    prediction_log_journal: bool = Field(True, description="survive SIGKILL: see db/journal.py")
    prediction_log_buffer_rows: int = Field(10_000, ge=1)
    # Rows of big content (full inputs, large outputs) filled memory long before the row
    # bound: spill at this many bytes of row text too (refuse at twice either bound).
    prediction_log_buffer_bytes: int = Field(
        64 * 2**20, ge=1024, description="in-memory row bytes per worker, then spool"
    )
    prediction_log_batch_rows: int = Field(1_000, ge=1)
    prediction_log_flush_ms: float = Field(200.0, gt=0)
    prediction_log_max_backoff_s: float = Field(5.0, gt=0)
    prediction_log_retention_s: float = Field(
        0.0, ge=0, description="delete rows older than this (db/log_retention.py); 0 = keep"
    )
    spool_dir: Path = Path("./spool")
    jobs_enabled: bool = True
    jobs_concurrency: int = Field(1, ge=0, description="jobs run at once per worker; 0 = API only")
    jobs_poll_ms: float = Field(500.0, gt=0)
    jobs_lease_s: float = Field(30.0, gt=0)
    jobs_max_attempts: int = Field(5, ge=1)
    jobs_result_ttl_s: float = Field(86_400.0, gt=0)
    jobs_max_result_bytes: int = Field(
        256 * 2**20, ge=1, le=2**30, description="a larger job result fails the job"
    )
    jobs_max_queued: int = Field(
        10_000, ge=0, description="submissions beyond this many queued jobs: 503; 0 = no cap"
    )
    jobs_count_interval_s: float = Field(
        15.0, ge=0, description="how often one worker per pod counts jobs; 0 = never"
    )

    # --- Observability (issue 4) --------------------------------------------------
    tracing_enabled: bool = True
    trace_tensor_values: int = Field(
        64, ge=1, le=65_536, description="values kept per tensor at trace_level TENSORS"
    )
    metrics_enabled: bool = True
    prometheus_multiproc_dir: Path | None = None

    # --- Security (issue 7) --------------------------------------------------------
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    auth_exempt_health: bool = True
    auth_exempt_metrics: bool = True

    # --- Benchmark aid (simulated_io.py) ------------------------------------------
    simulated_io_ms: float = Field(0.0, ge=0, le=10_000, description="0 = off")

    @property
    def worker_drain_s(self) -> int:
        """How long a draining worker waits for its requests (uvicorn's graceful shutdown):
        2 s less than Gunicorn's graceful timeout, so it ends, flushing its logs, before the
        arbiter's SIGKILL."""
        return max(1, math.ceil(self.graceful_timeout_s) - 2)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # Unchecked, a typo reached Gunicorn's log configuration, which said only "Unable to
        # configure logger 'gunicorn.error'", naming neither the setting nor the value.
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown log level; use one of {', '.join(LOG_LEVELS).lower()}")
        return value

    @field_validator("host")
    @classmethod
    def _address_or_host_name(cls, value: str) -> str:
        # Gunicorn read "" as every interface, "HOST:PORT" as its own port (PODSERVE_PORT
        # ignored), and a URL as an unclear bind error.
        if not value.strip():
            raise ValueError("is empty: leave it unset for 127.0.0.1 (0.0.0.0 or :: for all)")
        if not _is_ip_address(value) and not _is_host_name(value):
            raise ValueError(
                "is neither an IP address (IPv6 without brackets) nor a host name: no port "
                "(that is PODSERVE_PORT), scheme, path or spaces"
            )
        return value

    @field_validator(*_PATH_DEFAULTS, mode="before")
    @classmethod
    def _no_blank_path(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not value.strip():
            default = _PATH_DEFAULTS[str(info.field_name)]
            raise ValueError(
                f"is empty, which would be the working directory: leave it unset for {default}"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_when_set(cls, value: SecretStr | None) -> SecretStr | None:
        # A Kubernetes secretKeyRef to an empty key gives "": that turned authentication off.
        if value is not None and not value.get_secret_value().replace(",", " ").strip():
            raise ValueError("holds no key: leave it unset to run without authentication")
        return value

    @field_validator("loop_stall_s")
    @classmethod
    def _stall_longer_than_ticks(cls, value: float) -> float:
        if 0 < value < MIN_LOOP_STALL_S:
            raise ValueError(
                f"must be 0 (off) or at least {MIN_LOOP_STALL_S:g} s: the loop ticks every "
                f"{TICK_S:g} s, and a shorter bound takes a late tick for a stall"
            )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses_or_star(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is no IP address or network (CIDR)") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            # asyncpg reads "" as libpq's defaults (a local socket, the user's own database):
            # a database without podserve's schema, and a prediction log spooling for ever.
            raise ValueError("is empty: leave it unset to run without PostgreSQL")
        problem = value and url_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("graceful_timeout_s")
    @classmethod
    def _room_after_the_drain(cls, value: float) -> float:
        # Gunicorn kills a worker math.ceil(value) s after the stop signal; the worker drains
        # max(1, ceil - 2) s, then runs lifespan shutdown (log flush, job hand-back). At 1 s
        # both end together: the in-flight request was dropped without an answer, and
        # lifespan shutdown never ran.
        if value <= 1:
            raise ValueError(
                f"PODSERVE_GRACEFUL_TIMEOUT_S ({value}) must be more than 1 s: a worker drains "
                "max(1, ceil(PODSERVE_GRACEFUL_TIMEOUT_S) - 2) s and Gunicorn kills it at "
                "ceil(PODSERVE_GRACEFUL_TIMEOUT_S) s; at 1 s no time is left for the answer to a "
                "request cut off by the drain nor for lifespan shutdown"
            )
        return value

    @property
    def body_bytes_in_flight_limit(self) -> int:
        return self.max_body_bytes_in_flight or 4 * self.max_body_bytes

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> Settings:
        # A smaller budget would refuse a lone body that PODSERVE_MAX_BODY_BYTES allows.
        if 0 < self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}), or 0 for 4 x max_body_bytes"
            )
        return self

    @model_validator(mode="after")
    def _grace_within_the_drain(self) -> Settings:
        # A grace as long as the drain would keep idle connections until their requests
        # are cut off.
        if self.drain_idle_grace_s >= self.worker_drain_s:
            raise ValueError(
                f"drain_idle_grace_s ({self.drain_idle_grace_s}) must be shorter than the "
                f"drain: graceful_timeout_s ({self.graceful_timeout_s}) - 2 s"
            )
        return self


def _is_ip_address(value: str) -> bool:
    if "%" in value:  # an IPv6 zone (fe80::1%eth0): Gunicorn's bind cannot parse it
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_host_name(value: str) -> bool:
    """RFC 1123 labels; an all-numeric last label is a mistyped IPv4 address (10.0.0.256)."""
    labels = value.removesuffix(".").split(".")
    return (
        len(value) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def host_resolution_problem(host: str) -> str | None:
    """Why PODSERVE_HOST cannot be bound by name (None for an IP address or a known name).

    Checked once in the Gunicorn master, not in the validator: every worker, and every
    Settings() of a tool or test, would otherwise ask the resolver again."""
    if _is_ip_address(host):
        return None
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:  # socket.gaierror
        return f"cannot be resolved ({exc.args[-1] if exc.args else type(exc).__name__})"
    return None


def is_secret(field: str) -> bool:
    """A setting whose value is never printed (a password in a URL, API keys)."""
    info = Settings.model_fields.get(field)
    return info is not None and SecretStr in (info.annotation, *get_args(info.annotation))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_errors(exc: ValidationError) -> list[str]:
    """`PODSERVE_PORT='abc': Input should be a valid integer` per invalid setting."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error.get("loc") else ""
        name = f"PODSERVE_{field.upper()}" if field else "settings"
        shown = field and not is_secret(field) and not isinstance(error.get("input"), dict)
        given = f"={error['input']!r}" if shown else ""
        lines.append(f"{name}{given}: {error['msg']}")
    return lines


def report_invalid(exc: ValidationError) -> int:
    """Print each invalid setting on one line (not pydantic's traceback); the exit status."""
    for line in settings_errors(exc):
        print(f"error: {line}", file=sys.stderr)
    return 2


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """PODSERVE_* variables that no setting reads, each with the closest setting's name: a
    typo (PODSERVE_WORKER=3) would otherwise be ignored in silence. PODSERVE_TEST_* are left
    to test harnesses."""
    known = [name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        # pydantic-settings matches names case-insensitively: podserve_workers is applied.
        upper = name.upper()
        if not upper.startswith("PODSERVE_") or upper.startswith("PODSERVE_TEST_"):
            continue
        setting = upper.removeprefix("PODSERVE_")
        if setting in known:
            continue
        close = " or ".join(f"PODSERVE_{match}" for match in closest_settings(setting, known))
        found.append(f"{name} (did you mean {close}?)" if close else name)
    return found


# Names other servers and habits use for a setting podserve names otherwise (Triton's
# --model-repository, TorchServe's model store, libpq's DSN): no spelling rule finds these.
SETTING_ALIASES = {
    "MODEL_DIR": "MODEL_REPOSITORY",
    "MODELS_DIR": "MODEL_REPOSITORY",
    "MODEL_PATH": "MODEL_REPOSITORY",
    "MODELS_PATH": "MODEL_REPOSITORY",
    "MODEL_STORE": "MODEL_REPOSITORY",
    "MODELS": "MODEL_REPOSITORY",
    "DSN": "DATABASE_URL",
    "DB_DSN": "DATABASE_URL",
    "DATABASE_DSN": "DATABASE_URL",
    "POSTGRES_URL": "DATABASE_URL",
    "POSTGRES_DSN": "DATABASE_URL",
    "PG_DSN": "DATABASE_URL",
    "API_TOKEN": "API_KEYS",
    "API_TOKENS": "API_KEYS",
}


def _abbreviates(short: str, word: str) -> bool:
    """`short` is `word` shortened: its letters in order, the first the same (DB: DATABASE,
    REPO: REPOSITORY, WORKER: WORKERS)."""
    if not short or short[0] != word[0]:
        return False
    letters = iter(word)
    return all(letter in letters for letter in short)  # `in` consumes: a subsequence


def closest_settings(setting: str, known: list[str]) -> list[str]:
    """The setting an unknown name (without PODSERVE_) most likely meant: a known alias;
    else the closest spelling (PROT: PORT), both of two as close (DB_POOL: DB_POOL_MAX, _MIN);
    else the one setting whose words the name's words each abbreviate (DB_URL: DATABASE_URL,
    MODEL_REPO: MODEL_REPOSITORY). A name like none of them gets no guess: []."""
    if setting in SETTING_ALIASES:
        return [SETTING_ALIASES[setting]]
    close = difflib.get_close_matches(setting, known, n=2, cutoff=0.75)
    if close:
        ratios = [difflib.SequenceMatcher(None, setting, name).ratio() for name in close]
        return sorted(close) if len(close) == 2 and ratios[0] == ratios[1] else close[:1]
    words = setting.split("_")
    if any(len(word) < 2 for word in words):
        return []
    matches = [
        name
        for name in known
        if len(parts := name.split("_")) == len(words) and all(map(_abbreviates, words, parts))
    ]
    return matches if len(matches) == 1 else []
