"""Adversarial texts to the demo `text` model through a real server: each a 200 with the
embedding the text makes alone, or a clear 400; never a 500 or a worker held for seconds."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest

INFER = "/v2/models/text/infer"
HUGE_WORDS = ("y" * 999 + " ") * 1000  # 1 MB of words that make one unknown token each


def _texts(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


def _embeddings(client: httpx.Client, texts: list[str]) -> np.ndarray:
    response = client.post(INFER, json=_texts(texts))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_a_long_text_of_huge_words_is_a_400_naming_it(client: httpx.Client) -> None:
    """It was read whole: 15 MB of such words held the worker's inference thread 8 s and
    raised its memory peak by 1.1 GB, for an answer of a few unknown tokens."""
    response = client.post(INFER, json=_texts(["a fine sentence", HUGE_WORDS]))
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert "element 1 has 1000000 characters" in error and "too few tokens" in error, error
    _embeddings(client, ["a fine sentence"])  # the worker serves on


def test_a_refused_text_does_not_fail_its_batch_mates(client: httpx.Client) -> None:
    sentence = "the embedding of a sentence does not depend on its batch"
    alone = _embeddings(client, [sentence])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = [_texts([HUGE_WORDS]) if i % 4 == 0 else _texts([sentence]) for i in range(16)]
        responses = list(pool.map(lambda body: client.post(INFER, json=body), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body["inputs"][0]["data"][0] == sentence:
            assert response.status_code == 200, response.text
            got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, alone[0], atol=1e-5)
        else:
            assert response.status_code == 400, response.text[:300]


@pytest.mark.parametrize(
    "texts",
    [[""], ["   ", "\n\t ", "\u3000\u00a0"], ["\x00\x00 nul bytes"], ["one"] * 200],
    ids=["empty", "whitespace", "nul", "many"],
)
def test_degenerate_texts_are_answered_as_alone(client: httpx.Client, texts: list[str]) -> None:
    got = _embeddings(client, texts)
    assert got.shape == (len(texts), 32) and np.isfinite(got).all()
    np.testing.assert_allclose(got[-1], _embeddings(client, texts[-1:])[0], atol=1e-5)


def test_a_lone_surrogate_is_a_400(client: httpx.Client) -> None:
    body = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}'
    response = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]
