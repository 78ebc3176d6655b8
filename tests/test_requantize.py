"""requantize (static / dynamic) and requantize_mult: reference vs Numba to the bit, exhaustive
over small domains, float error bounds, hand goldens."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import EXP_ZERO, FormatError, IntFormat, Rounding, Saturation, ScaleKind
from bbct.kernels.requantize import (
    quantize_multiplier,
    requantize,
    requantize_mult,
    requantize_mult_ref,
    requantize_ref,
)
from bbct.kernels.testing import (
    assert_bit_equal,
    assert_qtensor_equal,
    int_arrays,
    int_formats,
    rounding_modes,
    saturation_modes,
    shapes,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data(), int_formats(max_bits=16), shapes(), st.integers(0, 40))
@example(None, IntFormat(bits=8, rounding="RND_CONV"), (1, 3), 0)
def test_requantize_twins(data, fmt, shape, in_bits):
    if data is None:
        return
    x = data.draw(int_arrays(shape, in_bits + 2, signed=data.draw(st.booleans()) or fmt.signed))
    e_in = np.full((shape[0], 1), data.draw(st.integers(-20, 20)))
    a, b = requantize(x, e_in, fmt), requantize_ref(x, e_in, fmt)
    assert_qtensor_equal(a, b)
    exp_out = data.draw(int_arrays(a.exp.shape, 7))
    assert_qtensor_equal(requantize(x, e_in, fmt, exp_out), requantize_ref(x, e_in, fmt, exp_out))
    # per-element input exponents (static only): any shift, including huge left shifts
    e_el = data.draw(int_arrays(shape, 8))
    assert_qtensor_equal(requantize(x, e_el, fmt, exp_out), requantize_ref(x, e_el, fmt, exp_out))


def test_requantize_static_exhaustive_int10():
    """Every 10-bit input, every shift -3..12, every rounding and saturation mode, to s6 / u6."""
    x = np.arange(-512, 512, dtype=np.int64)[None, :]
    n = 0
    for mode, sat, signed, s in itertools.product(Rounding, Saturation, (True, False), range(-3, 13)):
        fmt = IntFormat(bits=6, signed=signed, rounding=mode, saturation=sat)
        e_out = np.full((1, 1), s)
        a = requantize(x, np.zeros((1, 1), np.int64), fmt, e_out)
        b = requantize_ref(x, np.zeros((1, 1), np.int64), fmt, e_out)
        assert_qtensor_equal(a, b)
        n += x.size
    assert n == 1024 * 6 * 3 * 2 * 16


def test_requantize_dynamic_exhaustive_pairs():
    """Blocks of two over every pair of 6-bit values, every rounding mode, to s4 (SAT/SAT_SYM)."""
    v = np.arange(-32, 32, dtype=np.int64)
    x = np.stack(np.meshgrid(v, v), -1).reshape(-1, 2)
    n = 0
    for mode, sat in itertools.product(Rounding, (Saturation.SAT, Saturation.SAT_SYM)):
        fmt = IntFormat(bits=4, block_size=2, rounding=mode, saturation=sat)
        a = requantize(x, np.zeros((1, 1), np.int64), fmt)
        assert_qtensor_equal(a, requantize_ref(x, np.zeros((1, 1), np.int64), fmt))
        n += x.shape[0]
        # the rule's promise: the block maximum never needs more than bits-1 bits after rounding
        amax = np.abs(a.data.astype(np.int64)).max(axis=1)
        assert np.all(amax <= 8)
    assert n == 4096 * 12


@settings(max_examples=100, deadline=None)
@given(st.data(), int_formats(min_bits=3, max_bits=16), st.integers(1, 50))
def test_requantize_dynamic_float_error(data, fmt, in_bits):
    """Dynamic, signed: |y*2**e_out - x*2**e_in| <= step/2 (RND*) or < step (TRN*) unless
    the negative extreme saturated under SAT_SYM (counted), where it is <= one step."""
    fmt = IntFormat.from_dict(fmt.to_dict() | {"signed": True})
    x = data.draw(int_arrays((3, 17), min(in_bits + 1, 60)))
    q = requantize(x, np.zeros((3, 1), np.int64), fmt)
    step = q.scale_array()
    err = np.abs(q.dequantize() - x.astype(np.float64))
    exact_ok = (err <= step) if fmt.rounding in (Rounding.TRN, Rounding.TRN_ZERO) else (err <= step / 2)
    assert np.all(exact_ok | (err <= step)) and (q.meta["overflow"] > 0 or np.all(exact_ok))


def test_requantize_hand_goldens():
    # block [300, -5, 0] at e_in = -10, to s8: bitlen(300) = 9, s = 9 - 7 = 2: 300/4 = 75,
    # -5/4 = -1.25 -> -1; exponent -10 + 2 = -8. Block [1, 0, 0]: s = 1 - 7 = -6 (a left
    # shift gains precision): code 64 at -16. Block [0, 0]: EXP_ZERO.
    q = requantize(np.array([[300, -5, 0, 1, 0, 0, 0, 0]]), np.array([[-10]]), IntFormat(bits=8, block_size=3))
    assert q.data.tolist() == [[75, -1, 0, 64, 0, 0, 0, 0]] and q.exp.tolist() == [[-8, -16, EXP_ZERO]]
    # 255: bitlen 8, s = 1, but 255/2 = 127.5 -> 128 (RND_CONV) > 127: s becomes 2, 63.75 -> 64
    q = requantize(np.array([[255]]), np.array([[0]]), IntFormat(bits=8))
    assert q.data.tolist() == [[64]] and q.exp.tolist() == [[2]] and q.meta["overflow"] == 0
    # with TRN the same 255 keeps s = 1: 127 at exponent 1
    q = requantize(np.array([[255]]), np.array([[0]]), IntFormat(bits=8, rounding="TRN"))
    assert q.data.tolist() == [[127]] and q.exp.tolist() == [[1]]
    # -255 with TRN, SAT_SYM: amax 255 gives s = 1, floor(-127.5) = -128 clips to -127 (counted)
    q = requantize(np.array([[-255]]), np.array([[0]]), IntFormat(bits=8, rounding="TRN", saturation="SAT_SYM"))
    assert q.data.tolist() == [[-127]] and q.meta["overflow"] == 1
    # static: 8 at e_in -4 is 0.5 at exponent 0: RND_CONV gives 0, RND gives 1, 24 (1.5) -> 2
    s8 = IntFormat(bits=8)
    assert requantize(np.array([[8, 24]]), np.array([[-4]]), s8, np.zeros((1, 1), np.int32)).data.tolist() == [[0, 2]]
    rnd = IntFormat(bits=8, rounding="RND")
    assert requantize(np.array([[8, 24]]), np.array([[-4]]), rnd, np.zeros((1, 1), np.int32)).data.tolist() == [[1, 2]]
    # static left shift past 62 bits: 1 * 2**70 in s8 saturates to 127 (SAT), wraps to 0 (WRAP)
    for sat, want in ((Saturation.SAT, 127), (Saturation.WRAP, 0)):
        f = IntFormat(bits=8, saturation=sat)
        a = requantize(np.array([[1]]), np.array([[70]]), f, np.zeros((1, 1), np.int32))
        assert a.data.tolist() == [[want]] and a.meta["overflow"] == 1
        assert_qtensor_equal(a, requantize_ref(np.array([[1]]), np.array([[70]]), f, np.zeros((1, 1), np.int32)))


def test_requantize_errors():
    with pytest.raises(FormatError, match="input exponents differ inside output block"):
        requantize(np.array([[1, 2]]), np.array([[0, 1]]), IntFormat())
    with pytest.raises(FormatError, match="requantize_mult for a multiplier"):
        requantize(np.array([1]), np.array([0]), IntFormat(scale=ScaleKind.MULT))
    with pytest.raises(TypeError, match="integer array expected"):
        requantize(np.zeros(3), np.zeros(1, np.int64), IntFormat())
    with pytest.raises(ValueError, match="must be < 2\\*\\*62"):
        requantize(np.array([1 << 62]), np.array([0]), IntFormat())


@SETTINGS
@given(
    int_arrays((5, 7), 40),
    st.integers(1, (1 << 15) - 1),
    st.integers(-10, 70),
    st.integers(2, 32),
    st.booleans(),
    rounding_modes(),
    saturation_modes(),
)
@example(np.full((5, 7), (1 << 39) - 1), (1 << 15) - 1, -10, 8, True, Rounding.RND, Saturation.WRAP)
@example(np.full((5, 7), -(1 << 39)), 1 << 14, 54, 8, True, Rounding.RND_CONV, Saturation.SAT)
def test_requantize_mult_twins(x, m, shift, bits, signed, mode, sat):
    shift = np.arange(7) + shift  # per-channel shifts
    a = requantize_mult(x, m, shift, bits, signed, mode, sat)
    b = requantize_mult_ref(x, m, shift, bits, signed, mode, sat)
    assert_bit_equal(a[0], b[0])
    assert a[1] == b[1]


@SETTINGS
@given(st.data(), rounding_modes(), saturation_modes())
def test_requantize_mult_per_row_twins(data, mode, sat):
    """One multiplier and one shift per row (attention scores): the per-row kernel, on drawn
    cases and on the extremes (largest 40-bit values, huge left shifts, shifts past 62)."""
    cases = [
        (np.full((5, 7), (1 << 39) - 1), (1 << 15) - 1, -10, 8, True),
        (np.full((5, 7), -(1 << 39)), 1 << 14, 58, 8, True),
        (
            data.draw(int_arrays((5, 7), 40)),
            data.draw(st.integers(1, (1 << 15) - 1)),
            data.draw(st.integers(-10, 70)),
            data.draw(st.integers(2, 32)),
            data.draw(st.booleans()),
        ),
    ]
    for x, m, s0, bits, signed in cases:
        shift = (np.arange(5) + s0)[:, None]
        a = requantize_mult(x, m, shift, bits, signed, mode, sat)
        b = requantize_mult_ref(x, m, shift, bits, signed, mode, sat)
        assert_bit_equal(a[0], b[0])
        assert a[1] == b[1]
        # written straight into the format's own dtype: the same codes and events
        dt = IntFormat(bits=bits, signed=signed).dtype
        for sh in (shift, np.arange(7) + s0):  # per-row kernel and the general one
            c = requantize_mult(x, m, sh, bits, signed, mode, sat, dt)
            d = requantize_mult_ref(x, m, sh, bits, signed, mode, sat)
            assert c[0].dtype == dt and np.array_equal(c[0], d[0]) and c[1] == d[1]


@pytest.mark.parametrize("dtype, bits, signed", [(np.int8, 9, True), (np.uint8, 8, True), (np.int16, 16, False)])
def test_requantize_mult_refuses_a_dtype_too_narrow(dtype, bits, signed):
    with pytest.raises(ValueError, match="does not hold"):
        requantize_mult(np.array([[1, 2]]), 3, np.array([[1]]), bits, signed, dtype=dtype)


def test_requantize_mult_golden_and_multiplier():
    # 1/sqrt(32) = 0.17677..: frexp gives 0.7071 * 2**-2; M = round(0.7071 * 2**15) = 23170, shift 17
    m, s = quantize_multiplier(32**-0.5)
    assert (m, s) == (23170, 17) and abs(m * 2.0**-s - 32**-0.5) < 2**-15 * 32**-0.5
    # 100 * 23170 = 2317000; / 2**17 = 17.677 -> 18 (any RND*); TRN -> 17
    assert requantize_mult(np.array([100]), m, s, 8)[0].tolist() == [18]
    assert requantize_mult(np.array([100]), m, s, 8, True, Rounding.TRN)[0].tolist() == [17]
    # exactly half: 3 * 1 >> 1 = 1.5 -> 2 (RND_CONV), 1 (RND_ZERO)
    assert requantize_mult(np.array([3, -3]), 1, 1, 8)[0].tolist() == [2, -2]
    assert requantize_mult(np.array([3, -3]), 1, 1, 8, True, Rounding.RND_ZERO)[0].tolist() == [1, -1]
    for real in (1e-6, 0.3, 1.0, 7.5, 1234.5):
        m, s = quantize_multiplier(real, 12)
        assert 1 << 11 <= m < 1 << 12 and abs(m * 2.0**-s - real) <= 2**-12 * real
    with pytest.raises(ValueError, match="must stay below 2\\*\\*62"):
        requantize_mult(np.array([1 << 50]), 1 << 20, 0, 16)
    with pytest.raises(ValueError, match="positive and finite"):
        quantize_multiplier(-1.0)


def test_block_kernels_at_the_datapath_edges():
    """The per-block kernels (one input exponent per row) at powers of two plus/minus one up
    to the 2**62 datapath limit, every shift 0..64 and every rounding and saturation mode."""
    from bbct.kernels.blockshift import bitlen as _bitlen
    from bbct.kernels.formats import bit_length_ref

    edges = sorted({v for k in range(63) for v in ((1 << k) - 1, 1 << k, (1 << k) + 1) if v < 1 << 62})
    assert [int(_bitlen(np.int64(v))) for v in edges] == [bit_length_ref(v) for v in edges]
    x = np.array([edges + [-v for v in edges]], np.int64)
    for mode, sat in itertools.product(Rounding, Saturation):
        fmt = IntFormat(bits=16, block_size=0, rounding=mode, saturation=sat)
        for s in (0, 1, 2, 31, 61, 62, 64):
            e_out = np.full((1, 1), s)
            assert_qtensor_equal(
                requantize(x, np.zeros((1, 1), np.int64), fmt, e_out),
                requantize_ref(x, np.zeros((1, 1), np.int64), fmt, e_out),
            )
        assert_qtensor_equal(
            requantize(x, np.zeros((1, 1), np.int64), fmt), requantize_ref(x, np.zeros((1, 1), np.int64), fmt)
        )


def test_block_kernels_left_shifts_near_the_limit():
    """Static left shifts per block: exact loops when ``bitlen(max|x|) - s <= 62``, element
    by element beyond (SAT clips by sign, WRAP keeps the low bits). Blocks of 3 and 32 and
    whole rows mix both cases; every rounding and saturation mode; an all-zero block."""
    edges = sorted({v for k in range(63) for v in ((1 << k) - 1, 1 << k, (1 << k) + 1) if v < 1 << 62})
    vals = edges + [-v for v in edges] + [0] * 32
    x = np.array([vals, vals[::-1]], np.int64)
    for mode, sat in itertools.product(Rounding, Saturation):
        for bs in (0, 3, 32):
            fmt = IntFormat(bits=16, block_size=bs, rounding=mode, saturation=sat)
            for s in (-1, -2, -30, -31, -45, -60, -61, -62, -63, -64, -70):
                e_out = np.full((1, 1), s)
                assert_qtensor_equal(
                    requantize(x, np.zeros((2, 1), np.int64), fmt, e_out),
                    requantize_ref(x, np.zeros((2, 1), np.int64), fmt, e_out),
                )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]),
    int_formats(max_bits=16, max_block=40),
    st.booleans(),
)
def test_block_kernels_read_every_int_dtype(data, dt, fmt, static):
    """Rows read in their own dtype (no int64 copy), long rows and blocks of up to 40 (the
    vectorized loops and their remainders), all-zero blocks, static and dynamic."""
    info = np.iinfo(dt)
    x = data.draw(int_arrays((3, 97), min(info.bits, 62), signed=info.min < 0))
    x[1, data.draw(st.integers(0, 60)) :][:32] = 0
    x = x.astype(dt)
    e_in = data.draw(int_arrays((3, 1), 5))
    exp_out = None
    if static:
        exp_out = data.draw(int_arrays(requantize(x, e_in, fmt).exp.shape, 6))
    assert_qtensor_equal(requantize(x, e_in, fmt, exp_out), requantize_ref(x, e_in, fmt, exp_out))


def test_requantize_big_endian_and_range_error_first():
    """Big-endian input (as read from a file) gives the native result; an input beyond 2**62
    is reported before a bad ``exp_out``, as the reference does."""
    x = np.arange(8).reshape(2, 4) * 3
    f = IntFormat(bits=4, block_axis=-1, block_size=0)
    e = np.zeros((2, 1), np.int64)
    assert_bit_equal(requantize(x.astype(">i4"), e, f).data, requantize_ref(x, e, f).data)
    fb = IntFormat(bits=8, block_axis=-1, block_size=2)
    for fn in (requantize, requantize_ref):
        with pytest.raises(ValueError, match="must be < 2"):
            fn(np.array([[1 << 62, 1]]), np.zeros((1, 1), np.int64), fb, np.array([[0.5]]))
