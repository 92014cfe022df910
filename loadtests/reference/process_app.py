"""Variant 3 of the article: a 1-process ProcessPoolExecutor, model loaded in its initializer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request, Response

from loadtests.reference.common import (
    Embedder,
    model_dir,
    queued_call,
    response,
    simulated_io,
    texts_of,
)

_embedder: Embedder | None = None  # lives in the pool's child process


def _load() -> None:
    global _embedder
    _embedder = Embedder(model_dir())


def _embed(texts: list[str], submitted: float) -> tuple[np.ndarray, float, float]:
    return queued_call(_embedder, texts, submitted)  # in the child process


pool: ProcessPoolExecutor | None = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global pool
    pool = ProcessPoolExecutor(max_workers=1, initializer=_load)
    await asyncio.get_running_loop().run_in_executor(pool, _embed, ["warm up"], time.perf_counter())
    try:
        yield
    finally:
        pool.shutdown(cancel_futures=True)  # else the child outlives the worker


app = FastAPI(lifespan=lifespan)


@app.post("/v2/models/minilm/infer")
async def infer(request: Request) -> Response:
    texts = texts_of(await request.body())
    embedding, infer_s, queue_s = await asyncio.get_running_loop().run_in_executor(
        pool, _embed, texts, time.perf_counter()
    )
    io_s = await simulated_io()
    body, headers = response(embedding, infer_s, io_s, queue_s)
    return Response(body, headers=headers, media_type="application/json")
