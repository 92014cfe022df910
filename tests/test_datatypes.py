"""The datatype mapping every response uses to name its outputs' types."""

from __future__ import annotations

import numpy as np
import pytest

from podserve.datatypes import V2_TO_NUMPY, numpy_to_v2


@pytest.mark.parametrize("name", sorted(V2_TO_NUMPY))
def test_every_v2_datatype_maps_back_to_its_name(name: str) -> None:
    assert numpy_to_v2(V2_TO_NUMPY[name]) == name


def test_arrays_dtypes_and_text_kinds_are_named() -> None:
    assert numpy_to_v2(np.zeros(2, dtype=np.float32).dtype) == "FP32"
    assert numpy_to_v2(np.array(["a"]).dtype) == "BYTES"  # numpy unicode strings
    assert numpy_to_v2(np.array([b"a"]).dtype) == "BYTES"


def test_a_dtype_without_v2_name_is_refused() -> None:
    with pytest.raises(ValueError, match="complex64"):
        numpy_to_v2(np.dtype(np.complex64))
