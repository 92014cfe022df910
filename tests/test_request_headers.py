"""The per-request header dict and the content checks that read it (no server needed)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from podserve.errors import UnsupportedMediaType
from podserve.http_body import check_content_type
from podserve.request_headers import HEADERS_SCOPE_KEY, request_headers


def _scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}


def test_values_by_lower_case_name_and_the_first_of_repeated_headers_wins() -> None:
    scope = _scope((b"content-type", b"application/json"), (b"x-request-id", b"first"),
                   (b"x-request-id", b"second"), (b"x-caf\xe9", b"caf\xe9"))  # fmt: skip
    headers = request_headers(scope)
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == Request(scope).headers["x-request-id"] == "first"
    assert headers["x-caf\xe9"] == "caf\xe9"  # latin-1, as Starlette decodes them
    assert "content-length" not in headers


def test_built_once_per_request() -> None:
    scope = _scope((b"x-a", b"1"))
    first = request_headers(scope)
    scope["headers"].append((b"x-b", b"2"))  # not read again: the dict is kept in the scope
    assert request_headers(scope) is first is scope[HEADERS_SCOPE_KEY]
    assert "x-b" not in first


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/octet-stream", "Application/JSON; charset=utf-8",
     "application/vnd.api+json", ""],
)  # fmt: skip
def test_json_types_accepted(content_type: str) -> None:
    scope = _scope((b"content-type", content_type.encode())) if content_type else _scope()
    check_content_type(Request(scope))


@pytest.mark.parametrize("encoding", [b"identity", b" GZip ", b"x-gzip", b"deflate"])
def test_compressed_bodies_accepted(encoding: bytes) -> None:
    check_content_type(Request(_scope((b"content-encoding", encoding))))


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([(b"content-type", b"text/plain")], "content type 'text/plain'"),
        ([(b"content-type", b"application/x-www-form-urlencoded; a=b")], "urlencoded"),
        ([(b"content-encoding", b" BR ")], "content encoding 'br'"),
    ],
)
def test_other_types_and_encodings_refused(headers: list, message: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=message):
        check_content_type(Request(_scope(*headers)))


def test_text_values_are_read_again_as_utf8() -> None:
    """An X-Request-Id "réq-ü-1" was logged as "rÃ©q-Ã¼-1" (its UTF-8 bytes read as latin-1)."""
    from podserve.request_headers import as_utf8

    raw = "réq-ü-1".encode()
    assert as_utf8(raw.decode("latin-1")) == "réq-ü-1"
    assert as_utf8(b"caf\xe9".decode("latin-1")) == "caf\ufffd"  # not UTF-8: replaced
    assert as_utf8(None) is None
