"""Number formats and the rounding/saturation primitives: reference vs Numba, every midpoint."""

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels.formats import (
    EXP_ZERO,
    FormatError,
    IntFormat,
    QTensor,
    Rounding,
    Saturation,
    ScaleKind,
    bit_length,
    bit_length_ref,
    sat_bounds,
    saturate,
    saturate_array,
    saturate_ref,
    shift_round,
    shift_round_array,
    shift_round_ref,
)

# value/2 for x in (5, 3, -3, -5) is (2.5, 1.5, -1.5, -2.5): the rounding table of formats.py
MIDPOINTS = {
    Rounding.TRN: (2, 1, -2, -3),
    Rounding.TRN_ZERO: (2, 1, -1, -2),
    Rounding.RND: (3, 2, -1, -2),
    Rounding.RND_ZERO: (2, 1, -1, -2),
    Rounding.RND_INF: (3, 2, -2, -3),
    Rounding.RND_CONV: (2, 2, -2, -2),
}


@pytest.mark.parametrize("mode", list(Rounding))
def test_midpoint_table(mode):
    got_ref = tuple(shift_round_ref(x, 1, mode) for x in (5, 3, -3, -5))
    got_nb = tuple(int(shift_round(x, 1, int(mode))) for x in (5, 3, -3, -5))
    assert got_ref == got_nb == MIDPOINTS[mode]


def test_non_midpoints_round_to_nearest():
    # 7/4 = 1.75 -> 2 and -7/4 -> -2 in every RND* mode; 5/4 = 1.25 -> 1
    for mode in (Rounding.RND, Rounding.RND_ZERO, Rounding.RND_INF, Rounding.RND_CONV):
        assert shift_round_ref(7, 2, mode) == 2 and shift_round_ref(-7, 2, mode) == -2
        assert shift_round_ref(5, 2, mode) == 1 and shift_round_ref(-5, 2, mode) == -1


def test_shift_round_exhaustive_small_domain():
    xs = np.arange(-(1 << 10), 1 << 10, dtype=np.int64)
    n = 0
    for mode, s in itertools.product(Rounding, range(-3, 13)):
        want = np.array([shift_round_ref(int(x), s, mode) for x in xs])
        got = shift_round_array(xs, s, mode)
        np.testing.assert_array_equal(got, want, err_msg=f"mode {mode.name} shift {s}")
        n += xs.size
    assert n == 2048 * 6 * 16


@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 61), (1 << 61) - 1), st.integers(-8, 62), st.sampled_from(list(Rounding)))
@example((1 << 61) - 1, 62, Rounding.RND)
@example(-(1 << 61), 61, Rounding.RND_CONV)
@example(-1, 62, Rounding.TRN)
def test_shift_round_twins(x, s, mode):
    if s < 0 and abs(x).bit_length() - s > 62:
        return  # the Numba contract: results stay below 2**62
    assert int(shift_round(x, s, int(mode))) == shift_round_ref(x, s, mode)


@pytest.mark.parametrize("bits,signed", [(2, True), (8, True), (8, False), (16, True), (32, True), (32, False)])
@pytest.mark.parametrize("mode", list(Saturation))
def test_saturate_at_type_limits(bits, signed, mode):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    for x in (lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1, hi + 2**bits):
        want, over = saturate_ref(x, bits, signed, mode)
        b_lo, b_hi, wrap = sat_bounds(bits, signed, mode)
        assert int(saturate(x, b_lo, b_hi, wrap, bits)) == want
        if mode == Saturation.WRAP:
            assert (want - x) % (1 << bits) == 0 and lo <= want <= hi
        elif mode == Saturation.SAT_SYM and signed:
            assert want == max(-hi, min(hi, x))
        else:
            assert want == max(lo, min(hi, x))
        assert over == (want != x)


def test_sat_sym_never_produces_the_most_negative_code():
    out, n = saturate_array(np.array([-128, -127, 127, 200]), 8, True, Saturation.SAT_SYM)
    assert out.tolist() == [-127, -127, 127, 127] and n == 2


@given(st.integers(-(1 << 62), (1 << 62)))
@example(0)
@example(-(1 << 62))
def test_bit_length_twins(x):
    assert int(bit_length(x)) == bit_length_ref(x) == abs(x).bit_length()


def test_format_validation_and_serialisation():
    f = IntFormat(bits=6, signed=False, block_size=9, scale="mult", mant_bits=5, rounding="trn", saturation="WRAP")
    assert f.scale == ScaleKind.MULT and f.rounding == Rounding.TRN and f.dtype == np.uint8
    assert IntFormat.from_dict(f.to_dict()) == f and hash(IntFormat.from_dict(f.to_dict())) == hash(f)
    assert IntFormat(bits=40).dtype == np.int64
    with pytest.raises(FormatError, match="bits=1"):
        IntFormat(bits=1)
    with pytest.raises(FormatError, match="rounding='NEAREST' is not one of TRN"):
        IntFormat(rounding="NEAREST")
    with pytest.raises(FormatError, match="block_size=-1"):
        IntFormat(block_size=-1)
    with pytest.raises(FormatError, match="unknown format field"):
        IntFormat.from_dict({"bits": 8, "width": 3})
    with pytest.raises(TypeError, match="integer array expected"):
        QTensor(np.zeros(3), IntFormat(), np.zeros(1, np.int32))


def test_qtensor_dequantize_blocks_that_do_not_divide():
    # 5 elements, blocks of 2: exponents -1, 0, 3 for blocks [0,1], [2,3], [4]
    q = QTensor(np.array([[1, 2, 3, 4, 5]], np.int8), IntFormat(block_size=2), np.array([[-1, 0, 3]], np.int32))
    assert q.dequantize().tolist() == [[0.5, 1.0, 3.0, 4.0, 40.0]]
    assert EXP_ZERO < -1000
