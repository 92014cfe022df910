"""Dynamic batching per model, with admission control.

A batch closes at `max_batch_size` rows, at `max_batch_delay_ms`, or at once when an
inference thread is idle: waiting for rows only pays off while the thread is busy
(measured: a fixed delay costs its full length at low load and gains nothing).

A request of more rows than `max_batch_size` (of a model whose rows are independent:
pieces.piece_rows) queues as pieces of at most that many rows, one piece at a time: each is
batched like any request, and the next joins the queue's tail once it is answered, so other
models' and clients' batches get the thread between two of its pieces (one 256-row request
to a slow model held a worker's only thread for 1.8-2.9 s).

Each session run has its own ort.RunOptions: once every request of a running batch has
given up (deadline passed, client gone, its request's other piece failed), the run is
terminated instead of holding the thread for answers nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from podserve import batching_demotion
from podserve.client_disconnect import ClientConnection
from podserve.errors import (
    ClientClosedRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    RejectedRequests,
    StoppedWaiting,
    note_phases,
)
from podserve.inference_pool import ONLINE, InferencePool, Turn
from podserve.onnx_model import BatchResult, OnnxModel
from podserve.pieces import join_pieces, piece_rows, slice_rows
from podserve.processors import Tensors

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: a request is found in the queue by `is`, not by its arrays
class PendingRequest:
    inputs: Tensors
    rows: int
    key: tuple
    future: asyncio.Future[InferenceOutcome]
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    context: Any = None  # opaque to the batcher: the request's trace context
    run: SessionRun | None = None  # the session run it is (or was last) in


class SessionRun:
    """One session run of a batch. Its RunOptions let the batcher end the run early once
    every request in it has given up (`terminate`); they are the run's alone while it runs
    (those of an earlier run that was not terminated: making one costs ~1 us)."""

    __slots__ = ("options", "requests", "running", "started")

    def __init__(
        self, requests: Sequence[PendingRequest], started: float, options: ort.RunOptions
    ) -> None:
        self.requests = requests
        self.started = started  # perf_counter: when its batch began (its requests' queue end)
        self.options = options
        self.running = True

    def abandoned(self) -> bool:
        """Still running, not terminated yet, and nobody waits for any of its requests'
        answers any more."""
        return (
            self.running
            and not self.options.terminate
            and all(item.future.done() for item in self.requests)
        )


class RunTerminated(RuntimeError):
    """A session run ended early because every request of its batch had given up: nobody
    gets this error (their futures are done), observers see it on the batch."""


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
class SplitOutcome(InferenceOutcome):
    """A request run in pieces: its outputs joined in order. Its phases (see
    SplitRequest.phases): `queue`, the time none of its pieces ran (before the first, and
    between pieces waiting for the thread again); `preprocess`, `infer`, `postprocess`, the
    sums over its pieces' runs. batch_rows and batch_requests: those of its largest batch."""

    pieces: list[InferenceOutcome] = field(default_factory=list)

    def model_inputs(self) -> Tensors | None:
        """The pieces' session inputs joined, where they fit together (token ids padded to
        each piece's longest do not: None)."""
        parts = [piece.model_inputs() for piece in self.pieces]
        if not parts or any(part is None for part in parts):
            return None
        rows = [piece.feed_rows[1] - piece.feed_rows[0] for piece in self.pieces]
        return join_pieces(parts, rows)  # type: ignore[arg-type]


class SplitRequest:
    """A request queued as pieces; `future` is done once every piece is, or at the first
    piece that fails (its error is the request's)."""

    __slots__ = ("future", "left", "pieces", "queued")

    def __init__(self, pieces: list[PendingRequest], future: asyncio.Future[None]) -> None:
        self.pieces = pieces
        self.future = future
        self.queued = 0  # pieces[:queued] have entered the queue: their rows are its
        self.left = len(pieces)

    def phases(self, now: float) -> tuple[float, float]:
        """Seconds its pieces waited for the thread while none of them ran (up to `now`),
        and seconds some piece of it ran (they run one after another; should two overlap,
        the time they ran together counts once)."""
        intervals = sorted(
            span for piece in self.pieces if (span := _run_span(piece, now)) is not None
        )
        ran, covered = 0.0, self.pieces[0].enqueued
        for start, end in intervals:
            start = max(start, covered)
            if end > start:
                ran += end - start
                covered = end
        elapsed = now - self.pieces[0].enqueued
        return elapsed - ran, ran

    def end(self) -> float:
        """When its last piece's run ended (all pieces answered)."""
        return max(_run_span(piece, 0.0)[1] for piece in self.pieces)  # type: ignore[index]


def _run_span(piece: PendingRequest, now: float) -> tuple[float, float] | None:
    """When a piece's run started and ended (`now` while it runs or where it failed); None
    if it never started."""
    future = piece.future
    if future.done() and not future.cancelled() and future.exception() is None:
        outcome = future.result()
        start = piece.enqueued + outcome.queue_s
        return start, start + outcome.preprocess_s + outcome.infer_s + outcome.postprocess_s
    run = piece.run
    return None if run is None else (run.started, max(now, run.started))


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


ModelKey = tuple[str, str]  # (name, version): the model whose rows a reservation holds
_ONLY_MODEL: ModelKey = ("", "")  # a budget used for one model only


class QueueBudget:
    """Per-worker bound on rows waiting for a batch, shared by all models.

    While more than one model is served (`models`: the runtime's batchers' (name, version)
    keys, read when the rule applies, so it follows what is loaded; a model's versions are
    one model, with one share), a model may also hold no more queued rows than were free
    before its request: a dynamic threshold (Choudhury and Hahne's, as
    switches share a buffer; alpha 1). n flooded models settle at about max_rows/(n+1) each,
    and the rows left free admit a quiet model's request (one of up to max_rows/2 rows
    beside a lone flooder), so a flood sheds its own model's requests, not its neighbours'
    (one flooded model had shed 26-33% of another's). A lone model queues about half the
    bound in a pod of several, the whole bound in a pod of one."""

    def __init__(
        self, max_rows: int, retry_after_s: int, models: Collection[ModelKey] = ()
    ) -> None:
        self.max_rows = max_rows
        self.retry_after_s = retry_after_s
        self.models = models
        self.queued_rows = 0
        self._held: dict[str, int] = {}  # queued rows by model name (all versions); none at 0

    def reserve(self, rows: int, model: ModelKey = _ONLY_MODEL) -> None:
        if rows > self.max_rows:
            raise PayloadTooLarge(  # it could never be admitted: say what to do instead
                f"{rows} rows exceed the queue capacity of {self.max_rows} rows per worker "
                "(PODSERVE_MAX_QUEUE_ROWS); send fewer rows per request, or submit them as a "
                "background job"
            )
        free = self.max_rows - self.queued_rows
        if rows > free:
            raise Overloaded(
                f"server busy: {self.queued_rows} rows queued in this worker (limit "
                f"{self.max_rows}, PODSERVE_MAX_QUEUE_ROWS); retry later",
                retry_after_s=self.retry_after_s,
            )
        name = model[0]
        held = self._held.get(name, 0)
        if held + rows > free and self._several_models():
            raise Overloaded(
                f"server busy: model '{name}' holds {held} of the {self.queued_rows} rows "
                f"queued in this worker, and {rows} more would exceed its share while other "
                f"models are served (at most the {free} rows free); retry later",
                retry_after_s=self.retry_after_s,
            )
        self.queued_rows += rows
        self._held[name] = held + rows

    def release(self, rows: int, model: ModelKey = _ONLY_MODEL) -> None:
        self.queued_rows -= rows
        held = self._held.pop(model[0], 0) - rows
        if held > 0:
            self._held[model[0]] = held

    def held(self, model: ModelKey) -> int:
        """Rows the requests of `model` (any of its versions) hold in the queue."""
        return self._held.get(model[0], 0)

    def _several_models(self) -> bool:
        return len({name for name, _version in self.models}) > 1


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
        self._model_key = (model.name, model.version)  # its rows' owner in the budget
        self.observers = observers if observers is not None else []
        self._queue: deque[PendingRequest] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self.runs_terminated = 0  # session runs ended early: all their requests gave up
        self._spare_options: list[ort.RunOptions] = []  # of runs that ended unterminated
        self._turn = Turn()  # the pool serves the model that ran longest ago first

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
        if rows > self.model.max_batch_size and (size := piece_rows(self.model)) is not None:
            return await self._submit_split(inputs, rows, size, deadline, context, client)
        self.budget.reserve(rows, self._model_key)
        loop = asyncio.get_running_loop()
        item = PendingRequest(
            inputs,
            rows,
            self._batch_key(inputs),
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
            raise DeadlineExceeded(_LATE, *_spent(item, time.perf_counter())) from None
        finally:
            if client is not None:
                client.on_lost = None
            if not item.future.done():
                item.future.cancel()
            if item.future.cancelled():  # gave up (deadline, cancelled): maybe still queued
                self._withdraw(item)

    def _batch_key(self, inputs: Tensors) -> tuple:
        """Requests merge only with equal keys: the model's, and a pre-processor's padding
        class (texts of about one length), as padding to a batch-mate's longer text costs
        the short ones as much as the long one (processors.TokenizerPreprocessor)."""
        key = self.model.batch_key(inputs)
        preprocessor = self.model.preprocessor
        return key if preprocessor is None else (*key, preprocessor.padding_class(inputs))

    # --- requests in pieces -------------------------------------------------------
    async def _submit_split(
        self,
        inputs: Tensors,
        rows: int,
        size: int,
        deadline: float | None,
        context: Any,
        client: ClientConnection | None,
    ) -> InferenceOutcome:
        """A request of more rows than one run takes, in pieces of `size` rows. Admission
        reserves all its rows at once, and each piece frees its own when its batch takes it
        (the rows still to run are queued work: podserve_queue_rows counts them); one
        deadline and one client for all; the first piece that fails fails the request, and
        the others are dropped (a run of only given-up requests is terminated)."""
        self.budget.reserve(rows, self._model_key)
        split = self._make_split(inputs, rows, size, deadline, context)
        self._queue_next_piece(split)
        if client is not None:
            client.on_lost = lambda: self._abandon_split(split)
        try:
            if deadline is None:
                await split.future
            else:
                await asyncio.wait_for(split.future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            raise DeadlineExceeded(_LATE, *split.phases(time.perf_counter())) from None
        except Exception as exc:  # a piece's: where the whole request's time went
            _note_split_phases(exc, *split.phases(time.perf_counter()))
            raise
        finally:
            if client is not None:
                client.on_lost = None
            self._drop_pieces(split)
        outcomes = [piece.future.result() for piece in split.pieces]
        outputs = join_pieces([o.outputs for o in outcomes], [p.rows for p in split.pieces])
        if outputs is None:
            return await self._run_whole(inputs, rows, deadline, context, client)
        return _joined(split, outcomes, outputs)

    def _make_split(
        self, inputs: Tensors, rows: int, size: int, deadline: float | None, context: Any
    ) -> SplitRequest:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()  # every piece's `enqueued`: the request's
        pieces = [
            PendingRequest(
                piece := slice_rows(inputs, start, start + size),
                min(size, rows - start),
                self._batch_key(piece),
                loop.create_future(),
                now,
                deadline,
                context,
            )
            for start in range(0, rows, size)
        ]
        split = SplitRequest(pieces, loop.create_future())
        for piece in pieces:
            piece.future.add_done_callback(lambda done: self._piece_done(split, done))
        return split

    def _piece_done(self, split: SplitRequest, piece: asyncio.Future[InferenceOutcome]) -> None:
        """A piece answered: the request fails with it, or its next piece queues, or it is
        whole."""
        if piece.cancelled():  # dropped once the request was over
            return
        error = piece.exception()  # retrieved even when the request is over already
        if split.future.done():
            return
        if error is not None:
            split.future.set_exception(error)
            return
        split.left -= 1
        if split.left:
            self._queue_next_piece(split)
        else:
            split.future.set_result(None)

    def _queue_next_piece(self, split: SplitRequest) -> None:
        """Its next piece joins the queue's tail once the one before is answered: the
        request waits its turn again, behind what arrived meanwhile for this model and for
        the thread (a batch of another model already waiting for it runs first). One piece
        at a time, a request never holds more than one of the pool's threads."""
        if split.queued == len(split.pieces):
            return
        piece = split.pieces[split.queued]
        split.queued += 1
        self._queue.append(piece)
        self._queued_rows += piece.rows
        self._arrived.set()

    def _drop_pieces(self, split: SplitRequest) -> None:
        """The request is over: pieces never queued give their rows back, queued ones leave
        the queue, and a run of its pieces that nobody else waits for is terminated."""
        never = split.pieces[split.queued :]
        split.queued = len(split.pieces)  # no more pieces join the queue
        if never:
            self.budget.release(sum(piece.rows for piece in never), self._model_key)
        for piece in split.pieces:
            if not piece.future.done():
                piece.future.cancel()
                self._withdraw(piece)

    def _abandon_split(self, split: SplitRequest) -> None:
        """Its client is gone: the request ends now (submit drops its pieces)."""
        if not split.future.done():
            phases = split.phases(time.perf_counter())
            split.future.set_exception(ClientClosedRequest(_CLIENT_GONE, *phases))

    async def _run_whole(
        self,
        inputs: Tensors,
        rows: int,
        deadline: float | None,
        context: Any,
        client: ClientConnection | None,
    ) -> InferenceOutcome:
        """Rare: the pieces' outputs do not fit together (the warm-up found a row per input
        row for 2 and 3 rows, these rows make others). As when a merged batch shows it,
        the model is served unbatched from now on, and the request runs again as one."""
        if self.model.batching:
            self.model.batching = False
            log.warning(
                "model outputs have no row per input row: batching turned off",
                extra={"model": self.model.name, "version": self.model.version, "rows": rows},
            )
            batching_demotion.publish(self.model)  # the pod's other workers follow
        return await self.submit(inputs, rows, deadline, context, client)

    # --- dispatch ---------------------------------------------------------------
    async def _dispatch_forever(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self.pool.acquire(ONLINE, self._turn)
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
        self.budget.release(item.rows, self._model_key)

    def _withdraw(self, item: PendingRequest) -> None:
        """A request that gave up while queued frees its rows at once: left in the queue until
        a thread next takes a batch, they would shed live requests (503) meanwhile."""
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch, which released its rows then
            self._end_if_abandoned(item.run)
            return
        self._forget(item)

    def _abandon(self, item: PendingRequest) -> None:
        """Its client is gone: out of the queue, or out of its batch if that has started
        (answered 499 now; the run goes on for its batch-mates, if any still wait)."""
        if item.future.done():
            return
        try:
            self._queue.remove(item)
        except ValueError:  # taken into a batch, which released its rows then
            item.future.set_exception(ClientClosedRequest(_CLIENT_GONE, *_spent(item)))
            self._end_if_abandoned(item.run)
            return
        self._forget(item)
        waited = time.perf_counter() - item.enqueued
        item.future.set_exception(ClientClosedRequest(_CLIENT_GONE, waited))

    def _end_if_abandoned(self, run: SessionRun | None) -> None:
        """A request of `run` gave up: terminate the run if none of its requests waits."""
        if run is not None and run.abandoned():
            run.options.terminate = True

    async def _run(self, batch: list[PendingRequest]) -> None:
        started = time.perf_counter()
        start_ns = time.time_ns()
        result, error = await self._attempt(batch, started)
        if not batch:  # every request was rejected for its values: no session ran
            self.pool.release()
            return
        if error is not None and len(batch) > 1:
            # One bad request must not fail its batch-mates: rerun the batch in halves.
            # Whatever fails meanwhile (an observer that raises included), the slot is given
            # back (else one thread: the worker hangs) and no request is left unanswered.
            try:
                self._observe(batch, None, start_ns, error)  # the failed run counts too
                await self._rerun_in_halves(batch)
            except Exception:
                log.exception("rerunning a failed batch failed", extra={"model": self.model.name})
                self._resolve(
                    [item for item in batch if not item.future.done()], None, error, started
                )
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
        """Each observer (metrics, tracing) sees the run; one that raises is logged and the
        others still run: its bug must not fail the batch's requests or leak the slot."""
        record = BatchRecord(self.model, batch, result, start_ns, time.time_ns(), error)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                log.exception("a batch observer failed", extra={"model": self.model.name})

    async def _attempt(
        self, batch: list[PendingRequest], started: float
    ) -> tuple[BatchResult | None, Exception | None]:
        """_run_valid's result, or the error it raised (the caller decides who gets it)."""
        try:
            return await self._run_valid(batch, started), None
        except Exception as exc:
            return None, exc

    async def _run_valid(self, batch: list[PendingRequest], started: float) -> BatchResult | None:
        """One session run for the batch. Requests whose values the model refuses (NaN, Inf)
        are answered with their error and removed from `batch`; the others run as one."""
        try:
            return await self._run_session(batch, started)
        except RejectedRequests as rejected:
            for index, error in rejected.errors.items():
                self._resolve([batch[index]], None, error, started)
            batch[:] = [item for index, item in enumerate(batch) if index not in rejected.errors]
            return await self._run_session(batch, started) if batch else None

    async def _run_session(self, batch: list[PendingRequest], started: float) -> BatchResult:
        spare = self._spare_options
        run = SessionRun(batch, started, spare.pop() if spare else ort.RunOptions())
        for item in batch:
            item.run = run
        try:
            return await self.pool.run_in_slot(
                self.model.run_batch,
                [item.inputs for item in batch],
                [item.rows for item in batch],
                run.options,
            )
        except RejectedRequests:  # nothing ran: the requests with bad values get their 400s
            raise
        except Exception:
            if not run.options.terminate:
                raise
            # Every request of the batch had given up: the error is nobody's (not a failure
            # of the model, no 500, not counted as an inference error).
            self.runs_terminated += 1
            raise RunTerminated(
                f"session run terminated after {time.perf_counter() - started:.3f} s: every "
                "request of its batch had given up"
            ) from None
        finally:
            run.running = False  # from now on nothing sets its options' terminate
            run.requests = _NOBODY  # no cycle with its requests (each keeps `run`): no GC
            if not run.options.terminate:
                spare.append(run.options)

    async def _rerun_in_halves(self, failed: list[PendingRequest]) -> None:
        """Bisect a failed session run: each half (contiguous requests in batch order) is one
        session run, and a half that fails is halved again. One bad request among n costs
        ~2*log2(n) reruns instead of n (each alone held the thread while the others waited).
        When both halves fail, most of the batch is bad (a model that fails every input, a
        client repeating a bad payload): their requests rerun alone, as halving on would cost
        up to twice as many runs; so a batch never costs more than two runs a level over
        rerunning each alone. Requests answered meanwhile are left out; a model that stopped
        batching (a merged output it could not split) reruns each request alone."""
        live = [item for item in failed if not self._gave_up(item)]
        if len(live) < 3 or not self.model.batching:
            for item in live:
                await self._rerun([item])
            return
        middle = len(live) // 2
        first = await self._rerun(live[:middle])
        second = await self._rerun(live[middle:])
        if first and second:
            for item in first + second:
                await self._rerun([item])
            return
        await self._rerun_in_halves(first or second)

    async def _rerun(self, part: list[PendingRequest]) -> list[PendingRequest]:
        """One session run for part of a failed batch; observed like any run (a failed one
        too: each rerun is a record, as the merged run was). Returns the part when its run
        failed and it holds more than one request (unanswered, to be split), else []."""
        part = [item for item in part if not self._gave_up(item)]  # while earlier parts ran
        if not part:
            return []
        start_ns, own_start = time.time_ns(), time.perf_counter()
        result, error = await self._attempt(part, own_start)
        if not part:  # every request was rejected for its values: no session ran
            return []
        if error is not None and len(part) > 1:
            self._observe(part, None, start_ns, error)
            return part
        # Its queue phase lasts until its own run: the failed runs before it were waiting
        # too (they were missing from its Server-Timing).
        self._resolve(part, result, error, own_start)
        self._observe(part, result, start_ns, error)
        return []

    def _gave_up(self, item: PendingRequest) -> bool:
        """Answered already, or its deadline has passed (then answered now): not rerun. Its
        rows were released when its batch took it."""
        return self._drop_if_dead(item, time.perf_counter(), release=False)

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
_NOBODY: tuple[PendingRequest, ...] = ()
_CLIENT_GONE = "the client closed the connection before its request was answered"
_LATE = "request deadline exceeded before inference finished"


def _spent(item: PendingRequest, now: float | None = None) -> tuple[float, float | None]:
    """Queue and infer seconds of a request that gives up now: its wait, and how long its
    batch has run if it is running (a request waiting for its rerun is queued)."""
    now = time.perf_counter() if now is None else now
    run = item.run
    if run is None or not run.running:
        return now - item.enqueued, None
    return run.started - item.enqueued, now - run.started


def _note_split_phases(error: BaseException, queue_s: float, infer_s: float) -> None:
    """A piece's error is its whole request's: with the whole request's phases."""
    if isinstance(error, StoppedWaiting):
        error.waited_s, error.ran_s = queue_s, infer_s or None
    else:
        note_phases(error, queue_s, infer_s)


def _joined(
    split: SplitRequest, outcomes: list[InferenceOutcome], outputs: Tensors
) -> SplitOutcome:
    """The whole request's outcome: the phases SplitOutcome describes."""
    queue_s, _ = split.phases(split.end())
    largest = max(outcomes, key=lambda outcome: outcome.batch_rows)
    return SplitOutcome(
        outputs=outputs,
        queue_s=queue_s,
        preprocess_s=sum(o.preprocess_s for o in outcomes),
        infer_s=sum(o.infer_s for o in outcomes),
        postprocess_s=sum(o.postprocess_s for o in outcomes),
        batch_rows=largest.batch_rows,
        batch_requests=largest.batch_requests,
        pieces=outcomes,
    )


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
