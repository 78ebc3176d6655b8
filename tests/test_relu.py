"""ReLU on codes: exhaustive over int16, kernel equal to its reference, exact against float ReLU
of the dequantized tensor (POW2 and MULT blocks), a hand golden, errors."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import EXP_ZERO, IntFormat, QTensor
from bbct.kernels.quantize import quantize
from bbct.kernels.relu import make_relu_params, relu, relu_ref
from bbct.kernels.testing import assert_bit_equal, int_arrays

INT16 = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)


def test_relu_exhaustive_int16():
    p = make_relu_params(16)
    y, n = relu(INT16, p)
    assert n == 0
    assert_bit_equal(y, relu_ref(INT16, p)[0])
    # independent rule: negatives (and -32768, the type minimum) become 0, the rest pass unchanged
    assert_bit_equal(y, np.where(INT16 > 0, INT16, 0))


def test_relu_hand_golden():
    # s8 codes at exponent -3: [-128, -1, 0, 1, 127] are [-16, -0.125, 0, 0.125, 15.875];
    # ReLU gives [0, 0, 0, 0.125, 15.875]: codes [0, 0, 0, 1, 127], exponent still -3
    y, n = relu(np.array([-128, -1, 0, 1, 127], np.int8), make_relu_params(8))
    assert y.tolist() == [0, 0, 0, 1, 127] and n == 0 and y.dtype == np.int64


@pytest.mark.parametrize(
    "fmt",
    [
        IntFormat(bits=8, block_size=3),  # 3 does not divide H = 10
        IntFormat(bits=4, block_size=0),
        IntFormat(bits=8, block_size=4, scale="MULT", mant_bits=4),
        IntFormat(bits=6, block_size=7, saturation="SAT_SYM"),
    ],
)
def test_relu_exact_against_float(fmt):
    """Tolerance 0: every block scale is positive, so max(q, 0) * scale == max(q * scale, 0)
    exactly; against the unquantized float the error is at most the input's quantization
    error (ReLU is 1-Lipschitz and maps 0 to 0)."""
    rng = np.random.default_rng(fmt.bits)
    x = rng.normal(size=(6, 10)) * rng.uniform(0.01, 100, (6, 1))
    x[2] = 0.0  # an all-zero row: EXP_ZERO blocks stay as they are
    q = quantize(x, fmt)
    y, n = relu(q.data, make_relu_params(fmt.bits))
    out = QTensor(y.astype(fmt.dtype), fmt, q.exp, q.mant)
    np.testing.assert_array_equal(out.dequantize(), np.maximum(q.dequantize(), 0.0))
    assert n == 0 and np.all(q.exp[2] == EXP_ZERO)
    assert np.all(np.abs(out.dequantize() - np.maximum(x, 0)) <= np.abs(q.dequantize() - x))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(2, 62), st.lists(st.integers(1, 6), min_size=1, max_size=3))
@example(data=None, bits=62, shape=[2])
def test_relu_twins(data, bits, shape):
    p = make_relu_params(bits)
    if data is None:  # pinned: the type minimum and maximum of the widest codes
        x = np.array([-(1 << 61), (1 << 61) - 1], np.int64)
    else:
        x = data.draw(int_arrays(tuple(shape), bits))
    a, b = relu(x, p), relu_ref(x, p)
    assert_bit_equal(a[0], b[0])
    assert a[1] == b[1] == 0 and a[0].shape == x.shape


def test_relu_errors():
    p = make_relu_params(8)
    with pytest.raises(ValueError, match="code 128 is outside the signed 8-bit range"):
        relu(np.array([1, 128]), p)
    with pytest.raises(ValueError, match="code -129"):
        relu_ref(np.array([-129]), p)
    with pytest.raises(TypeError, match="integer array expected"):
        relu(np.zeros(3), p)
    with pytest.raises(ValueError, match="bits=63"):
        make_relu_params(63)
    assert p.to_dict() == {"bits": 8}
    assert relu(np.zeros((0, 3), np.int64), p)[0].shape == (0, 3)
