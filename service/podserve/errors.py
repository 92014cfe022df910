"""Errors that carry their HTTP status; the app renders them as {"error": "..."}."""

from __future__ import annotations

import contextlib


class PodserveError(Exception):
    status_code = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(PodserveError):
    status_code = 400


class NotFound(PodserveError):
    status_code = 404


class RequestTimeout(PodserveError):
    status_code = 408


class PayloadTooLarge(PodserveError):
    status_code = 413


class UnsupportedMediaType(PodserveError):
    status_code = 415


class Forbidden(PodserveError):
    status_code = 403


class ServiceUnavailable(PodserveError):
    status_code = 503


class Overloaded(ServiceUnavailable):
    """Admission control said no: the client should retry after a short while."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class StoppedWaiting(PodserveError):
    """A request that ended before its answer came: its wait is its `queue` phase, and the
    time its batch had been running when it gave up (if it had started) its `infer` phase."""

    def __init__(
        self, message: str, waited_s: float | None = None, ran_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.waited_s = waited_s  # how long it waited for its batch, where it did
        self.ran_s = ran_s  # how long its batch had run, where it had started


class DeadlineExceeded(StoppedWaiting):
    status_code = 504


class ClientClosedRequest(StoppedWaiting):
    """The client closed its connection while its request waited (nginx's 499): no one reads
    the answer, which is for the metrics and the access log."""

    status_code = 499


class ModelNotReady(ServiceUnavailable):
    """The models are still loading: the client should retry after a short while."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class MethodNotAllowed(PodserveError):
    status_code = 405

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message, headers={"Allow": allow})


class NotConfigured(PodserveError):
    """A feature this pod was not set up for (no database, jobs off): retrying cannot help,
    so not a 503, which clients and meshes (Istio's default retry policy) retry."""

    status_code = 501


def routing_error_message(
    status: int, detail: str, method: str, path: str, allow: str | None, docs_url: str | None
) -> str:
    """The message of a 404 or 405 from routing (Starlette's bare "Not Found" and "Method Not
    Allowed"): the route asked for, and what the server has there or at all. Any other
    detail is kept as it is (a handler's own words)."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    if status == 405 and detail == "Method Not Allowed":
        if not allow:
            return f"Method Not Allowed: {method} {shown}"
        return f"Method Not Allowed: {shown} takes {allow}, not {method}"
    if status == 404 and detail == "Not Found":
        slash = " (drop the trailing '/')" if len(path) > 1 and path.endswith("/") else ""
        docs = f", docs at {docs_url}" if docs_url else ""
        return (
            f"Not Found: no route {method} {shown}{slash}; the APIs are under /v2 (Open "
            f"Inference Protocol: /v2/models/<model>/infer) and /v1 (KServe V1: "
            f"/v1/models/<model>:predict){docs}"
        )
    return detail


def check_rows(count: int, limit: int) -> None:
    """The model's per-request row limit: a 413 past it."""
    if count > limit:
        raise PayloadTooLarge(f"{count} rows exceed the limit of {limit} per request")


def note_phases(error: BaseException, queue_s: float, infer_s: float) -> None:
    """A request that failed in its own session run: how long it waited and ran, for its
    error answer's Server-Timing (`phases_of`)."""
    with contextlib.suppress(AttributeError):  # a type without a __dict__: no timing
        error.podserve_phases = (queue_s, infer_s)  # type: ignore[attr-defined]


def phases_of(error: BaseException) -> tuple[float, float | None] | None:
    """Queue and infer seconds of a request that ended in `error`, where known: a 504's or
    a 499's wait and, if its batch had started, how long that had run (infer None: it never
    ran), or what note_phases noted."""
    if isinstance(error, StoppedWaiting):
        return None if error.waited_s is None else (error.waited_s, error.ran_s)
    return getattr(error, "podserve_phases", None)


class RejectedRequests(Exception):
    """Some requests of a batch hold values the model must not see (NaN, Inf), or texts its
    tokenizer refuses (processors.py); nothing ran.

    `errors` maps each such request's index in the batch to its client error; the batcher
    answers those and runs the others as one batch. A batch of one raises the error itself.
    """

    def __init__(self, errors: dict[int, BadRequest]) -> None:
        super().__init__(f"{len(errors)} request(s) of the batch rejected")
        self.errors = errors
