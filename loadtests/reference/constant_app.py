"""The HTTP ceiling: a bare FastAPI endpoint that reads the request and returns a constant."""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request, Response

app = FastAPI()
# The shape of podserve's tabular answer, computed once.
BODY = orjson.dumps(
    {
        "model_name": "tabular",
        "model_version": "1",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.9, 0.1]},
        ],
    }
)


@app.post("/v2/models/tabular/infer")
async def infer(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")
