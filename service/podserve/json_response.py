"""orjson-encoded responses (numpy arrays included): ~20x faster than stdlib json."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content, option=OPTIONS),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )
