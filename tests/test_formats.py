"""Number formats and the rounding/saturation primitives: reference vs Numba, every midpoint."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import (
    EXP_ZERO,
    FormatError,
    IntFormat,
    QTensor,
    Rounding,
    Saturation,
    ScaleKind,
    bit_length,
    bit_length_ref,
    div_round,
    div_round_ref,
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


def test_every_midpoint_every_shift():
    """(2k+1) * 2**(s-1) is exactly k + 0.5 at shift s: all k in -64..63, shifts 1..20, every
    mode, reference vs Numba vs the rule written in the mode table."""
    rules = {
        Rounding.TRN: lambda k, neg: k,
        Rounding.TRN_ZERO: lambda k, neg: k + 1 if neg else k,
        Rounding.RND: lambda k, neg: k + 1,
        Rounding.RND_ZERO: lambda k, neg: k + 1 if neg else k,
        Rounding.RND_INF: lambda k, neg: k if neg else k + 1,
        Rounding.RND_CONV: lambda k, neg: k + (k & 1),
    }
    n = 0
    for mode, s, k in itertools.product(Rounding, range(1, 21), range(-64, 64)):
        x = (2 * k + 1) << (s - 1)
        want = rules[mode](k, x < 0)
        assert shift_round_ref(x, s, mode) == want == int(shift_round(x, s, int(mode)))
        n += 1
    assert n == 6 * 20 * 128


def test_saturate_exhaustive_small_widths():
    """Every x in -300..300 narrowed to every width 2..8, signed and unsigned, every mode."""
    xs = np.arange(-300, 301, dtype=np.int64)
    n = 0
    for bits, signed, mode in itertools.product(range(2, 9), (True, False), Saturation):
        got, cnt = saturate_array(xs, bits, signed, mode)
        want = [saturate_ref(int(x), bits, signed, mode) for x in xs]
        assert got.tolist() == [w[0] for w in want] and cnt == sum(w[1] for w in want)
        n += xs.size
    assert n == 601 * 7 * 2 * 3


def test_bit_length_exhaustive_int16_and_powers():
    xs = list(range(-(1 << 15), 1 << 15)) + [s * ((1 << k) + d) for k in range(62) for d in (-1, 0) for s in (1, -1)]
    for x in xs:
        assert int(bit_length(x)) == bit_length_ref(x)


@pytest.mark.parametrize("mode", list(Saturation))
def test_saturate_62_bit_extremes(mode):
    lo, hi = -(1 << 61), (1 << 61) - 1
    for x in (lo - 1, lo, hi, hi + 1, (1 << 62) + 5, -(1 << 62) - 5):
        b_lo, b_hi, wrap = sat_bounds(62, True, mode)
        assert int(saturate(x, b_lo, b_hi, wrap, 62)) == saturate_ref(x, 62, True, mode)[0]


def test_format_properties_and_errors():
    f = IntFormat(bits=8, saturation="SAT_SYM")
    assert (f.qmin, f.qmax) == (-127, 127) and (IntFormat(bits=8).qmin, IntFormat(bits=4, signed=False).qmax) == (
        -128,
        15,
    )
    assert len({IntFormat(), IntFormat(bits=8), IntFormat(rounding="RND_CONV")}) == 1  # hashable, equal
    assert IntFormat(bits=5).short() == "s5 b*@-1 pow2 RND_CONV/SAT"
    with pytest.raises(FormatError, match="bits=63"):
        IntFormat(bits=63)
    with pytest.raises(FormatError, match="mant_bits=32"):  # 17..31: a model's given float scales
        IntFormat(mant_bits=32)
    with pytest.raises(FormatError, match="saturation='CLIP'"):
        IntFormat(saturation="CLIP")
    with pytest.raises(FormatError, match="mant must be given exactly"):
        QTensor(np.zeros(3, np.int8), IntFormat(scale="MULT"), np.zeros(1, np.int32))
    for d in (IntFormat().to_dict(), IntFormat(bits=3, signed=False, scale="MULT", block_axis=0).to_dict()):
        assert IntFormat.from_dict(d).to_dict() == d


def _round_fraction(f: Fraction, mode: Rounding) -> int:
    """Independent oracle: the rounding table applied to an exact rational."""
    sign = -1 if f < 0 else 1
    return {
        Rounding.TRN: lambda: math.floor(f),
        Rounding.TRN_ZERO: lambda: math.trunc(f),
        Rounding.RND: lambda: math.floor(f + Fraction(1, 2)),
        Rounding.RND_ZERO: lambda: sign * math.ceil(abs(f) - Fraction(1, 2)),
        Rounding.RND_INF: lambda: sign * math.floor(abs(f) + Fraction(1, 2)),
        Rounding.RND_CONV: lambda: round(f),  # Fraction.__round__ is half to even
    }[mode]()


def test_div_round_exhaustive_small_domain():
    """Every x in -300..300 over every divisor 1..24, every mode: reference and Numba equal the
    exact rational rounded by the table (ties 2r == n for every even n); powers of two agree
    with shift_round."""
    n_checked = 0
    for mode, n in itertools.product(Rounding, range(1, 25)):
        for x in range(-300, 301):
            want = _round_fraction(Fraction(x, n), mode)
            assert div_round_ref(x, n, mode) == want == int(div_round(x, n, int(mode))), (x, n, mode)
            n_checked += 1
        if n & (n - 1) == 0:
            s = n.bit_length() - 1
            assert all(div_round_ref(x, n, mode) == shift_round_ref(x, s, mode) for x in range(-300, 301))
    assert n_checked == 6 * 24 * 601
    # the table's midpoints as divisions: 5/2, 3/2, -3/2, -5/2
    for mode, want in MIDPOINTS.items():
        assert tuple(div_round_ref(x, 2, mode) for x in (5, 3, -3, -5)) == want
    with pytest.raises(ValueError, match="divisor n=0"):
        div_round_ref(1, 0, Rounding.RND)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(1 << 62) + 1, (1 << 62) - 1), st.integers(1, (1 << 61) - 1), st.sampled_from(list(Rounding)))
@example((1 << 62) - 1, (1 << 61) - 1, Rounding.RND_CONV)
@example(-(1 << 62) + 1, 2, Rounding.RND_INF)
@example(-3 * ((1 << 60) - 1), (1 << 61) - 2, Rounding.RND)  # -1.5 with the largest even divisor: a tie
@example(-7, 14, Rounding.RND_ZERO)
def test_div_round_twins(x, n, mode):
    assert int(div_round(x, n, int(mode))) == div_round_ref(x, n, mode) == _round_fraction(Fraction(x, n), mode)
