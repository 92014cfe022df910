"""Prediction-log rows of the affine model, for tests that write them to PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from podserve.db.prediction_log import make_row


def affine_rows(prefix: str, count: int) -> list[list[Any]]:
    """`count` rows whose client request ids are `prefix0`, `prefix1`, ... (to count them)."""
    tensor = {"x": np.ones((1, 4), np.float32)}
    return [
        make_row(
            str(uuid.uuid4()),
            f"{prefix}{i}",
            "affine",
            "1",
            tensor,
            tensor,
            {"infer": 0.001},
            None,
            "digest",
        )
        for i in range(count)
    ]
