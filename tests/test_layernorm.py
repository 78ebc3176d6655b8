"""LayerNorm and isqrt: isqrt exhaustive over 0..2**16 and against math.isqrt on 62-bit values,
kernel equal to its reference, error bound against float LayerNorm, edge rows, a golden."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bbct.kernels.layernorm import isqrt, isqrt_ref, layernorm, layernorm_float, layernorm_ref, make_layernorm_params
from bbct.kernels.testing import assert_bit_equal, int_arrays


def test_isqrt_exhaustive_and_random():
    n = np.arange(0, (1 << 16) + 1)
    expect = [math.isqrt(int(v)) for v in n]
    assert [isqrt(int(v)) for v in n] == expect
    assert [isqrt_ref(int(v)) for v in n] == expect
    rng = np.random.default_rng(0)
    vals = [int(v) for v in rng.integers(0, 1 << 62, 5000)]
    for k in range(1, 32):  # perfect squares and their neighbours up to 2**62
        vals += [k * k - 1, k * k, (1 << (2 * k - 2)) - 1, (1 << (2 * k - 2)), ((1 << k) - 1) ** 2]
    vals += [(1 << 62) - 1, ((1 << 31) - 1) ** 2, ((1 << 31) - 1) ** 2 - 1]
    for v in vals:
        assert isqrt(v) == math.isqrt(v) == isqrt_ref(v), v


def test_layernorm_hand_golden():
    # H = 4, x = [-3, -1, 1, 3] at e_row = 0, gamma = 1, beta = [0, 0, 0, 0.5], eps = 0.
    # mean 0, variance 5, normalized [-1.3416, -0.4472, 0.4472, 1.3416].
    # Lowering: GAMMA = 16384 at e_gamma = -14; e_out = ceil(log2(2.5 / 32767)) = -13, so
    # BETA = 0.5 * 2**13 = 4096; FN = 14.
    # b = bitlen(3) = 2, M = (59 - 3 - 4) // 2 = 26: d = x << 26, V = 20 * 2**52 (57 bits),
    # t = 2, sigma = isqrt((V << 4) // 4) = isqrt(80 * 2**52) = 600239927 (sqrt(5) * 2**28),
    # R = 2**48 // sigma = 468937, n = (3 * 2**26 * R) >>RND 32 = 21981.42 -> 21981 (1.3416 Q.14).
    # y = (21981 * 16384) >>RND 15 = 10990.5 -> 10991 (half up), and -10990.5 -> -10990:
    # RND rounds a negative midpoint toward +inf. Float: +-10990.72 (gamma 1 at 2**-13).
    # x = +-1: n = +-7327.14 -> +-7327, y = +-3663.5 -> 3664 and -3663. Last: 10991 + 4096 = 15087.
    p = make_layernorm_params(np.ones(4), np.array([0, 0, 0, 0.5]), 0.0)
    assert (p.e_gamma, p.e_out, p.norm_frac_bits) == (-14, -13, 14)
    assert p.gamma.tolist() == [16384] * 4 and p.beta.tolist() == [0, 0, 0, 4096]
    y, e_out = layernorm(np.array([[-3, -1, 1, 3]]), np.array([[0]]), p)
    assert e_out == -13 and y.tolist() == [[-10990, -3663, 3664, 15087]]
    assert isqrt(80 << 52) == 600239927 and (1 << 48) // 600239927 == 468937


@pytest.mark.parametrize("h,eps,e_row", [(384, 1e-12, -12), (768, 1e-12, -16), (384, 1e-5, -20), (7, 1e-5, 0)])
def test_layernorm_error_vs_float(h, eps, e_row):
    rng = np.random.default_rng(h)
    g, b = rng.normal(1, 0.3, h), rng.normal(0, 0.2, h)
    p = make_layernorm_params(g, b, eps)
    x = rng.normal(size=(128, h)) * rng.uniform(0.01, 50, (128, 1)) + rng.normal(size=(128, 1)) * 4
    x = np.round(x * 2**12).astype(np.int64)  # 12 fraction bits: up to ~22-bit codes
    e = np.full((128, 1), e_row)
    y, e_out = layernorm(x, e, p)
    err = np.abs(y * 2.0**e_out - layernorm_float(x, e, g, b, eps)).max()
    # one output step: half for beta's rounding, half for the final RND; plus gamma's 16-bit
    # rounding (2**-16 relative) times |n| <= sqrt(H), and the normalized value's Q.14 step
    bound = 2.0**e_out + np.abs(g).max() * 2.0**-16 * np.sqrt(h) + np.abs(g).max() * 2.0**-14
    assert err < bound, (err, bound, 2.0**e_out)


def test_layernorm_edge_rows_and_errors():
    h = 5
    g, b = np.array([1.0, -2, 0.5, 1, 3]), np.array([0.25, 0, -1, 0.5, 0])
    p = make_layernorm_params(g, b, 1e-5)
    # a constant row (variance 0): normalized 0, output is beta; all zeros too
    for row in ([7] * h, [0] * h, [-(1 << 23)] * h):
        y, e_out = layernorm(np.array([row]), np.array([[-4]]), p)
        assert y.tolist() == [p.beta.tolist()]
    # H not a multiple of anything, extra leading axes, e_row broadcast from (B, 1, 1)
    x = np.arange(2 * 3 * h).reshape(2, 3, h) ** 2
    y, _ = layernorm(x, np.array([[[-3]], [[2]]]), p)
    assert_bit_equal(y, layernorm_ref(x, np.array([[[-3]], [[2]]]), p)[0])
    with pytest.raises(ValueError, match="would overflow the int64 variance"):
        layernorm(np.full((1, h), 1 << 28), np.zeros((1, 1), np.int64), p)
    # a varying row beyond the bound (its variance would wrap negative): refused, never hung
    wide = np.array([[-8153246259908784, 25797397883516704, -13866631510220393, 5, -7]])
    with pytest.raises(ValueError, match="would overflow the int64 variance"):
        layernorm(np.concatenate([np.zeros((1, h), np.int64), wide]), np.zeros((2, 1), np.int64), p)
    assert isqrt(np.int64(-4)) == 0 and isqrt(np.int64(0)) == 0
    with pytest.raises(TypeError, match="integer array"):
        layernorm(np.zeros((1, h)), np.zeros((1, 1), np.int64), p)
    with pytest.raises(ValueError, match="H=4 channels, gamma has 5"):
        layernorm(np.zeros((1, 4), np.int64), np.zeros((1, 1), np.int64), p)
    with pytest.raises(ValueError, match="does not broadcast"):
        layernorm(np.zeros((2, h), np.int64), np.zeros((3, 1), np.int64), p)


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(1, 5), st.integers(1, 48), st.integers(2, 24), st.integers(0, 20))
@example(data=None, rows=1, h=1, bits=2, fn=14)
def test_layernorm_twins(data, rows, h, bits, fn):
    rng = np.random.default_rng(h)
    p = make_layernorm_params(rng.normal(1, 0.5, h), rng.normal(0, 0.3, h), 1e-5 if h % 2 else 1e-12, norm_frac_bits=fn)
    if data is None:  # pinned: H = 1, type min/max of a 24-bit input, eps shifts left and right
        x = np.array([[-(1 << 23)], [(1 << 23) - 1], [0], [1], [-1]])
        for er in (-40, -10, 0, 30):
            e = np.full((5, 1), er)
            assert_bit_equal(layernorm(x, e, p)[0], layernorm_ref(x, e, p)[0])
        return
    x = data.draw(int_arrays((rows, h), bits))
    e = data.draw(int_arrays((rows, 1), 7))
    assert_bit_equal(layernorm(x, e, p)[0], layernorm_ref(x, e, p)[0])


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from([96, 384]), st.integers(2, 24), st.integers(0, 20), st.integers(-3, 0))
def test_layernorm_counted_long_rows_twins(data, h, bits, fn, exp_shift):
    """Rows of 96 and 384 (the vectorized loops), outputs that saturate (an output exponent
    below the one lowering picks), saturation events against the reference; an int64
    minimum is refused with the bound's message."""
    from bbct.kernels.layernorm import layernorm_counted, layernorm_counted_ref

    rng = np.random.default_rng(h + bits)
    g, b = rng.normal(1, 0.5, h), rng.normal(0, 0.3, h)
    e_out = make_layernorm_params(g, b, 1e-5).e_out + exp_shift
    p = make_layernorm_params(g, b, 1e-5, norm_frac_bits=fn, out_exp=e_out, out_bits=12)
    x = data.draw(int_arrays((3, h), bits))
    e = data.draw(int_arrays((3, 1), 7))
    (a, na), (r, nr) = layernorm_counted(x, e, p), layernorm_counted_ref(x, e, p)
    assert_bit_equal(a, r)
    assert na == nr
    x[1, data.draw(st.integers(0, h - 1))] = np.iinfo(np.int64).min
    for f in (layernorm_counted, layernorm_counted_ref):
        with pytest.raises(ValueError, match="64 bits with H="):
            f(x, e, p)
