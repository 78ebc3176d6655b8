"""embedding: gather twins to the bit, shapes, and the out-of-range id error."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bbct.kernels.embedding import embedding, embedding_ref
from bbct.kernels.formats import IntFormat
from bbct.kernels.quantize import quantize
from bbct.kernels.testing import assert_qtensor_equal, int_formats, qtensors

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data(), int_formats(max_bits=8, scale=None), st.integers(1, 12), st.integers(1, 20))
def test_embedding_twins(data, fmt, v, h):
    table = data.draw(qtensors(fmt, (v, h)))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    ids = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, v - 1)))
    a, b = embedding(table, ids), embedding_ref(table, ids)
    assert_qtensor_equal(a, b)
    assert a.shape == ids.shape + (h,)
    # every gathered row is the table's row, codes and scales unchanged
    flat = ids.ravel()
    assert np.array_equal(a.data.reshape(-1, h), np.asarray(table.data)[flat])
    assert np.array_equal(a.exp.reshape(flat.size, -1), np.asarray(table.exp)[flat])


def test_embedding_hand_golden():
    # row 0 [0.5, 1.0]: amax 1.0 <= 127 * 2**-6 (1.98) but not 127 * 2**-7: exp -6, codes
    # [32, 64]; row 1 [-2.0, 0.0]: amax 2.0 -> exp -5, codes [-64, 0]. Ids [1, 0, 1] copy them.
    table = quantize(np.array([[0.5, 1.0], [-2.0, 0.0]]), IntFormat(bits=8, block_size=2))
    out = embedding(table, np.array([[1, 0, 1]]))
    assert out.data.tolist() == [[[-64, 0], [32, 64], [-64, 0]]]
    assert out.exp.tolist() == [[[-5], [-6], [-5]]]


def test_embedding_rejects_out_of_range_ids():
    table = quantize(np.ones((5, 4)), IntFormat(block_size=2))
    with pytest.raises(ValueError, match=r"id 5 at position \(1,\) is outside the table's 0..4 \(V=5\)"):
        embedding(table, np.array([0, 5]))
    with pytest.raises(ValueError, match=r"id -1 at position \(0, 1\)"):
        embedding_ref(table, np.array([[0, -1]]))
    with pytest.raises(TypeError, match="integer array expected"):
        embedding(table, np.array([0.0]))
