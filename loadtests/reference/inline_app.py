"""Variant 1 of the article: the model runs inline in `async def` (blocks the event loop)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from loadtests.reference.common import Embedder, model_dir, response, simulated_io, texts_of

app = FastAPI()
embedder = Embedder(model_dir())  # loaded in each Gunicorn worker (no preload)


@app.post("/v2/models/minilm/infer")
async def infer(request: Request) -> Response:
    embedding, infer_s = embedder(texts_of(await request.body()))  # blocks the loop
    io_s = await simulated_io()
    body, headers = response(embedding, infer_s, io_s)
    return Response(body, headers=headers, media_type="application/json")
