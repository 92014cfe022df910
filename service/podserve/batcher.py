"""Dynamic batching per model, with admission control.

A batch closes at `max_batch_size` rows, at `max_batch_delay_ms`, or at once when an
inference thread is idle: waiting for rows only pays off while the thread is busy
(measured: a fixed delay costs its full length at low load and gains nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from podserve.client_disconnect import ClientConnection
from podserve.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    note_phases,
)
from podserve.inference_pool import ONLINE, InferencePool
from podserve.onnx_model import BatchResult, OnnxModel, RejectedRequests
from podserve.processors import Tensors


@dataclass(eq=False)  # identity: a request is found in the queue by `is`, not by its arrays
class PendingRequest:
    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future[InferenceOutcome]
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    context: Any = None  # opaque to the batcher: the request's trace context


@dataclass
class InferenceOutcome:
    outputs: Tensors
    queue_s: float
    preprocess_s: float
    infer_s: float
    postprocess_s: float
    batch_rows: int
    batch_requests: int
    batch_feed: Tensors | None = None  # what a pre-processor made of the whole batch
    feed_rows: tuple[int, int] = (0, 0)  # this request's rows of it: [start, stop)

    def model_inputs(self) -> Tensors | None:
        """This request's rows of the session's inputs (token ids, ...: padded as in its
        batch), where a pre-processor made them; views, only sliced when asked for."""
        if self.batch_feed is None:
            return None
        start, stop = self.feed_rows
        return {name: array[start:stop] for name, array in self.batch_feed.items()}


@dataclass
class BatchRecord:
    """What observers see of one session run (timestamps are time.time_ns())."""

    model: OnnxModel
    requests: list[PendingRequest]
    result: BatchResult | None
    start_ns: int
    end_ns: int
    error: BaseException | None = None


BatchObserver = Callable[[BatchRecord], None]


class QueueBudget:
    """Per-worker bound on rows waiting for a batch, shared by all models."""

    def __init__(self, max_rows: int, retry_after_s: int) -> None:
        self.max_rows = max_rows
        self.retry_after_s = retry_after_s
        self.queued_rows = 0

    def reserve(self, rows: int) -> None:
        if rows > self.max_rows:
            raise PayloadTooLarge(  # it could never be admitted: say what to do instead
                f"{rows} rows exceed the queue capacity of {self.max_rows} rows per worker "
                "(PODSERVE_MAX_QUEUE_ROWS); send fewer rows per request, or submit them as a "
                "background job"
            )
        if self.queued_rows + rows > self.max_rows:
            raise Overloaded(
                f"server busy: {self.queued_rows} rows queued (limit {self.max_rows}); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.queued_rows += rows

    def release(self, rows: int) -> None:
        self.queued_rows -= rows


class Batcher:
    def __init__(
        self,
        model: OnnxModel,
        pool: InferencePool,
        budget: QueueBudget,
        observers: list[BatchObserver] | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.budget = budget
        self.observers = observers if observers is not None else []
        self._queue: deque[PendingRequest] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="batcher")

    async def stop(self) -> None:
        if self._dispatcher:
            self._dispatcher.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(
        self,
        inputs: Tensors,
        rows: int,
        deadline: float | None = None,
        context: Any = None,
        client: ClientConnection | None = None,
    ) -> InferenceOutcome:
        if client is not None and client.lost:  # gone during an earlier phase: nothing to run
            raise ClientClosedRequest(_CLIENT_GONE)
        self.budget.reserve(rows)
        loop = asyncio.get_running_loop()
        item = PendingRequest(
            inputs,
            rows,
            self.model.batch_key(inputs),
            loop.create_future(),
            deadline=deadline,
            context=context,
        )
        self._queue.append(item)
        self._queued_rows += rows
        self._arrived.set()
        if client is not None:
            client.on_lost = lambda: self._abandon(item)
        try:
            if deadline is None:
                return await item.future
            return await asyncio.wait_for(item.future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            waited = time.perf_counter() - item.enqueued
            raise DeadlineExceeded(
                "request deadline exceeded before inference finished", waited
            ) from None
        finally:
            if client is not None:
                client.on_lost = None
            if not item.future.done():
                item.future.cancel()
            if item.future.cancelled():  # gave up (deadline, cancelled): maybe still queued
                self._withdraw(item)

    # --- dispatch ---------------------------------------------------------------
    async def _dispatch_forever(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self.pool.acquire(ONLINE)
            await self._wait_for_fill()
            batch = self._take_batch()
            if not batch:
                self.pool.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_fill(self) -> None:
        """Only while other batches occupy the pool: wait up to the delay for more rows.

        A thread that frees up ends the wait too (the pool is idle again: waiting no longer
        pays), not only an arrival or the delay."""
        delay = self.model.max_batch_delay_s
        if not (self.model.batching and delay > 0 and self.pool.busy > 1):
            return
        wake = self._arrived.set
        self.pool.on_release.add(wake)
        try:
            while (
                self.pool.busy > 1 and self._queue and self._queued_rows < self.model.max_batch_size
            ):
                remaining = self._queue[0].enqueued + delay - time.perf_counter()
                if remaining <= 0:
                    return
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self.pool.on_release.discard(wake)

    def _take_batch(self) -> list[PendingRequest]:
        """Oldest live request first, then others with the same batch key up to the limit."""
        batch: list[PendingRequest] = []
        rows = 0
        kept: deque[PendingRequest] = deque()
        now = time.perf_counter()
        while self._queue:
            item = self._queue.popleft()
            if self._drop_if_dead(item, now):
                continue
            fits = not batch or (
                self.model.batching
                and item.key == batch[0].key
                and rows + item.rows <= self.model.max_batch_size
            )
            if fits:
                batch.append(item)
                rows += item.rows
                self._forget(item)
            else:
                kept.append(item)
            if batch and (not self.model.batching or rows >= self.model.max_batch_size):
                break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _drop_if_dead(self, item: PendingRequest, now: float, release: bool = True) -> bool:
        """Skip a request nobody waits for any more (`release`: it still holds queued rows)."""
        if not item.future.done():  # done: cancelled, the client gave up or its deadline passed
            if item.deadline is None or now < item.deadline:
                return False
            waited = now - item.enqueued
            item.future.set_exception(
                DeadlineExceeded("request deadline exceeded in the queue", waited)
            )
        if release:
            self._forget(item)
        return True

    def _forget(self, item: PendingRequest) -> None:
        self._queued_rows -= item.rows
        self.budget.release(item.rows)

    def _withdraw(self, item: PendingRequest) -> None:
        """A request that gave up while queued frees its rows at once: left in the queue until
        a thread next takes a batch, they would shed live requests (503) meanwhile."""
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch, which released its rows then
            return
        self._forget(item)

    def _abandon(self, item: PendingRequest) -> None:
        """Its client is gone: out of the queue, unless its batch has started (then its
        answer is moments away and the rows are already released)."""
        if item.future.done():
            return
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._forget(item)
        waited = time.perf_counter() - item.enqueued
        item.future.set_exception(ClientClosedRequest(_CLIENT_GONE, waited))

    async def _run(self, batch: list[PendingRequest]) -> None:
        started = time.perf_counter()
        start_ns = time.time_ns()
        result: BatchResult | None = None
        error: BaseException | None = None
        try:
            result = await self._run_valid(batch, started)
        except Exception as exc:
            error = exc
        if not batch:  # every request was rejected for its values: no session ran
            self.pool.release()
            return
        if error is not None and len(batch) > 1:
            self._observe(batch, None, start_ns, error)  # the failed run counts too
            # One bad request must not fail its batch-mates: rerun each alone.
            try:
                await self._run_alone(batch, started)
            finally:
                self.pool.release()
            return
        self.pool.release()
        self._resolve(batch, result, error, started)
        self._observe(batch, result, start_ns, error)

    def _observe(
        self,
        batch: list[PendingRequest],
        result: BatchResult | None,
        start_ns: int,
        error: BaseException | None,
    ) -> None:
        record = BatchRecord(self.model, batch, result, start_ns, time.time_ns(), error)
        for observer in self.observers:
            observer(record)

    async def _run_valid(self, batch: list[PendingRequest], started: float) -> BatchResult | None:
        """One session run for the batch. Requests whose values the model refuses (NaN, Inf)
        are answered with their error and removed from `batch`; the others run as one."""
        try:
            return await self._run_session(batch)
        except RejectedRequests as rejected:
            for index, error in rejected.errors.items():
                self._resolve([batch[index]], None, error, started)
            batch[:] = [item for index, item in enumerate(batch) if index not in rejected.errors]
            return await self._run_session(batch) if batch else None

    async def _run_session(self, batch: list[PendingRequest]) -> BatchResult:
        return await self.pool.run_in_slot(
            self.model.run_batch, [item.inputs for item in batch], [item.rows for item in batch]
        )

    async def _run_alone(self, batch: list[PendingRequest], started: float) -> None:
        """Each request in a session run of its own; those answered meanwhile are skipped."""
        for item in batch:
            if self._drop_if_dead(item, time.perf_counter(), release=False):
                continue
            start_ns, own_start = time.time_ns(), time.perf_counter()
            result: BatchResult | None = None
            error: BaseException | None = None
            try:
                result = await self._run_session([item])
            except Exception as exc:
                error = exc
            # Its queue phase lasts until its own run: the failed merged run and the reruns
            # before it were waiting too (they were missing from its Server-Timing).
            self._resolve([item], result, error, own_start)
            self._observe([item], result, start_ns, error)

    def _resolve(
        self,
        batch: list[PendingRequest],
        result: BatchResult | None,
        error: BaseException | None,
        started: float,
    ) -> None:
        total_rows = sum(item.rows for item in batch)
        answers: list[Answer] = []
        first_row = 0
        for index, item in enumerate(batch):
            if result is None:
                failure = error or RuntimeError("inference failed")
                if len(batch) == 1:  # an error of its own: where its time went, as for an answer
                    note_phases(failure, started - item.enqueued, time.perf_counter() - started)
                answers.append((item, failure))
                continue
            outcome = InferenceOutcome(
                outputs=result.outputs[index],
                queue_s=started - item.enqueued,
                preprocess_s=result.preprocess_s,
                infer_s=result.infer_s,
                postprocess_s=result.postprocess_s,
                batch_rows=total_rows,
                batch_requests=len(batch),
                batch_feed=result.feed,
                feed_rows=(first_row, first_row + item.rows),
            )
            first_row += item.rows
            answers.append((item, outcome))
        _wake_in_turn(iter(answers))

    @property
    def queued_rows(self) -> int:
        return self._queued_rows


Answer = tuple["PendingRequest", "InferenceOutcome | BaseException"]
_CLIENT_GONE = "the client closed the connection before its request was run"


def _wake_in_turn(answers: Iterator[Answer]) -> None:
    """Answer one request of a batch now and the next one in the loop's next iteration.

    Answered together, a batch's requests resume in one loop iteration and run back to back
    (postprocess, encode, send: ~0.35 ms each for MiniLM), and a timer that falls due
    meanwhile (another request's awaited I/O) waits for all of them: 8 rows made the
    `features` phase's p99 ~3 ms longer. One per iteration, due timers and socket events
    get their turn between two responses; the last answer leaves no later than before.
    """
    for item, answer in answers:
        if item.future.done():  # cancelled meanwhile
            continue
        if isinstance(answer, BaseException):
            item.future.set_exception(answer)
        else:
            item.future.set_result(answer)
        item.future.get_loop().call_soon(_wake_in_turn, answers)
        return
