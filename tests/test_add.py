"""add: reference vs Numba to the bit over mismatched block layouts, exactness against
rational arithmetic, and hand goldens."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbct.kernels.add import _same_blocks, add, add_ref
from bbct.kernels.formats import EXP_ZERO, FormatError, IntFormat, QTensor, ScaleKind
from bbct.kernels.testing import assert_qtensor_equal, int_arrays, int_formats, qtensors, shapes

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data(), int_formats(max_bits=16), int_formats(max_bits=16, scale=None), shapes())
def test_add_twins(data, fo, fa, shape):
    fb = IntFormat(bits=8, block_size=data.draw(st.integers(0, 6)))
    fa = IntFormat.from_dict(fa.to_dict() | {"mant_bits": min(fa.mant_bits, 31 - fa.bits) or 1})
    a = data.draw(qtensors(fa, shape, exp_range=(-60, 5)))
    b = data.draw(qtensors(fb, shape, exp_range=(-60, 5)))
    assert_qtensor_equal(add(a, b, fo), add_ref(a, b, fo))
    exp_out = data.draw(int_arrays(add(a, b, fo).exp.shape, 6))
    assert_qtensor_equal(add(a, b, fo, exp_out), add_ref(a, b, fo, exp_out))


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(2, 9), st.integers(0, 30))
def test_add_same_layout_is_the_rounded_exact_sum(data, block, gap):
    """Same block layout, |ea - eb| <= 30: the sum is exact before the one requantization, so
    a 24-bit RND_CONV result equals the exact rational sum rounded at the output step."""
    fmt = IntFormat(bits=8, block_size=block)
    a = data.draw(qtensors(fmt, (2, 11), exp_range=(-10, -10), zero_blocks=False))
    b = data.draw(qtensors(fmt, (2, 11), exp_range=(-10 - gap, -10 - gap), zero_blocks=False))
    out = add(a, b, IntFormat(bits=40, block_size=block, rounding="RND_CONV"))
    want = [
        [Fraction(int(x)) * 2**-10 + Fraction(int(y)) * Fraction(2) ** (-10 - gap) for x, y in zip(ra, rb, strict=True)]
        for ra, rb in zip(a.data.tolist(), b.data.tolist(), strict=True)
    ]
    got = out.dequantize()
    for i in range(2):
        for j in range(11):
            assert Fraction(got[i, j]) == want[i][j]  # 40 bits hold every exact sum here


@settings(max_examples=100, deadline=None)
@given(st.data(), st.integers(1, 9), st.sampled_from([8, 16]), st.booleans())
def test_add_residual_layout_twins(data, block, bits, static):
    """Both operands and the output blocked alike along the last axis (the residual stream):
    the per-block kernel against the reference, with exponent gaps beyond 30, all-zero
    blocks, every rounding mode, static and dynamic output exponents."""
    from bbct.kernels.testing import rounding_modes

    mode = data.draw(rounding_modes())
    fa = IntFormat(bits=8, block_size=block)
    a = data.draw(qtensors(fa, (3, 13), exp_range=(-60, 10)))
    b = data.draw(qtensors(fa, (3, 13), exp_range=(-60, 10)))
    fo = IntFormat(bits=bits, block_size=block, rounding=mode)
    exp_out = data.draw(int_arrays(a.exp.shape, 7)) if static else None
    assert _same_blocks(a, fo) is not None and _same_blocks(b, fo) is not None  # the per-block kernel runs
    assert_qtensor_equal(add(a, b, fo, exp_out), add_ref(a, b, fo, exp_out))


def test_add_hand_golden():
    # 3 * 2**-2 + 5 * 2**-4 = 0.75 + 0.3125 = 1.0625: exact sum 17 at 2**-4; to s8 dynamic:
    # bitlen(17) = 5 <= 7, so s = -2: code 68 at 2**-6 (1.0625 exactly)
    a = QTensor(np.array([[3]], np.int8), IntFormat(), np.array([[-2]], np.int32))
    b = QTensor(np.array([[5]], np.int8), IntFormat(), np.array([[-4]], np.int32))
    s = add(a, b, IntFormat(bits=8))
    assert s.data.tolist() == [[68]] and s.exp.tolist() == [[-6]] and s.dequantize().item() == 1.0625
    # static exp_out -2: 17 at -4 is 4.25 at -2 -> 4 (RND_CONV)
    assert add(a, b, IntFormat(bits=8), np.array([[-2]], np.int32)).data.tolist() == [[4]]
    # exponents 40 apart: b is more than 30 below, so the common exponent is 0 - 30 = -30 and
    # 5 * 2**-40 becomes 5 >> 10 = 0 (RND_CONV): 1 * 2**0 comes back unchanged
    a = QTensor(np.array([[1]], np.int8), IntFormat(), np.array([[0]], np.int32))
    b = QTensor(np.array([[5]], np.int8), IntFormat(), np.array([[-40]], np.int32))
    s = add(a, b, IntFormat(bits=8))
    assert s.dequantize().item() == 1.0
    # an all-zero operand block (EXP_ZERO) never sets the exponent
    z = QTensor(np.array([[0]], np.int8), IntFormat(), np.array([[EXP_ZERO]], np.int32))
    assert add(a, z, IntFormat(bits=8)).dequantize().item() == 1.0
    assert add(z, z, IntFormat(bits=8)).exp.tolist() == [[EXP_ZERO]]


def test_add_errors():
    a = QTensor(np.array([[3]], np.int8), IntFormat(), np.array([[-2]], np.int32))
    with pytest.raises(FormatError, match="shapes differ"):
        add(a, QTensor(np.zeros((1, 2), np.int8), IntFormat(), np.zeros((1, 1), np.int32)), IntFormat())
    wide = QTensor(np.array([[1 << 31]], np.int64), IntFormat(bits=40), np.array([[0]], np.int32))
    with pytest.raises(ValueError, match="operand b has \\|value\\| 2147483648"):
        add(a, wide, IntFormat())
    with pytest.raises(FormatError, match="requantize_mult"):
        add(a, a, IntFormat(scale=ScaleKind.MULT))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([8, 16]), st.sampled_from([8, 16]), st.booleans())
def test_add_residual_layout_long_rows_twins(data, bits_a, bits, static):
    """The residual stream's shape: rows of 96 in blocks of 32 (the vectorized loops), an
    8- or 16-bit operand with an 8-bit one, exponent gaps within and beyond 30, every
    rounding mode, static and dynamic output exponents."""
    from bbct.kernels.testing import rounding_modes

    mode = data.draw(rounding_modes())
    a = data.draw(qtensors(IntFormat(bits=bits_a, block_size=32), (4, 96), exp_range=(-50, 10)))
    b = data.draw(qtensors(IntFormat(bits=8, block_size=32), (4, 96), exp_range=(-50, 10)))
    fo = IntFormat(bits=bits, block_size=32, rounding=mode)
    exp_out = data.draw(int_arrays(a.exp.shape, 7)) if static else None
    assert _same_blocks(a, fo) is not None and _same_blocks(b, fo) is not None
    assert_qtensor_equal(add(a, b, fo, exp_out), add_ref(a, b, fo, exp_out))
