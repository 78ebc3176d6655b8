"""bias_add: a per-channel bias added to fixed-point codes, saturating. Kernel equal to its
reference under hypothesis (edge values, every saturation mode), a hand golden, errors."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bbct.kernels.biasadd import bias_add, bias_add_ref
from bbct.kernels.formats import Saturation
from bbct.kernels.testing import assert_bit_equal, int_arrays, saturation_modes


@st.composite
def _case(draw):
    bits = draw(st.integers(2, 62))
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    width = min(bits + 2, 61)  # inputs a little beyond the output range: saturation happens
    x = draw(int_arrays((rows, n), width))
    b = draw(int_arrays((n,), width))
    return bits, x, b


@settings(max_examples=200, deadline=None)
@given(case=_case(), sat=saturation_modes())
@example(case=(8, np.array([[127, -128, 100]]), np.array([1, -1, 27])), sat=Saturation.SAT)  # lands on qmax/qmin
@example(case=(8, np.array([[127, -128, 0]]), np.array([1, -1, -128])), sat=Saturation.SAT_SYM)  # -128 clips to -127
@example(case=(62, np.array([[(1 << 61) - 1]]), np.array([(1 << 61) - 1])), sat=Saturation.WRAP)  # 2**62 - 2 wraps
def test_bias_add_twins(case, sat):
    bits, x, b = case
    got, ev = bias_add(x, b, bits, sat)
    want, ev_ref = bias_add_ref(x, b, bits, sat)
    assert_bit_equal(got, want)
    assert ev == ev_ref


def test_bias_add_hand_golden():
    # s8 output: 100 + 30 = 130 is above 127: clipped, one event; -100 - 30 = -130 clipped to
    # -128, one event; 5 + 1 = 6 exact. With WRAP, 130 is -126 (130 - 256) and -130 is 126.
    x, b = np.array([[100, -100, 5]]), np.array([30, -30, 1])
    assert [v.tolist() for v in bias_add(x, b, 8, Saturation.SAT)[0]] == [[127, -128, 6]]
    assert bias_add(x, b, 8, Saturation.SAT)[1] == 2
    assert bias_add(x, b, 8, Saturation.WRAP)[0].tolist() == [[-126, 126, 6]]


def test_bias_add_errors():
    with pytest.raises(ValueError, match="one per channel"):
        bias_add(np.zeros((2, 3), np.int64), np.zeros(4, np.int64), 8, Saturation.SAT)
    with pytest.raises(ValueError, match="bits=70"):
        bias_add(np.zeros((2, 3), np.int64), np.zeros(3, np.int64), 70, Saturation.SAT)
    with pytest.raises(TypeError):
        bias_add(np.zeros((2, 3)), np.zeros(3, np.int64), 8, Saturation.SAT)
    for f in (bias_add, bias_add_ref):  # a 0-d x has no channel axis (the twins disagreed on it)
        with pytest.raises(ValueError, match="one per channel"):
            f(np.array(5), np.array([1]), 8, Saturation.SAT)


def test_bias_add_node_validates_width_and_bias():
    """The IR node checks that the bias fits its declared width (2..62, checked by
    IntFormat), by name."""
    from bbct.kernels.formats import IntFormat
    from bbct.simulator.errors import LoweringError
    from bbct.simulator.ir import BiasAdd

    BiasAdd(name="b", inputs=("x",), bias=np.array([-128, 127]), fmt=IntFormat(bits=8))
    with pytest.raises(LoweringError, match=r"node b \(bias_add\): a bias that fits s8"):
        BiasAdd(name="b", inputs=("x",), bias=np.array([128]), fmt=IntFormat(bits=8))
