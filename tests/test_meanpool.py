"""Masked mean pooling: a hand golden at every rounding mode, exhaustive over pairs of int8
tokens, kernel equal to its reference, error bounds against the float formula on inputs
made by quantize + align over the sequence, edge rows and errors."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bbct.kernels.align import align
from bbct.kernels.formats import EXP_ZERO, IntFormat, Rounding, Saturation
from bbct.kernels.meanpool import make_mean_pool_params, mean_pool, mean_pool_exp, mean_pool_float, mean_pool_ref
from bbct.kernels.quantize import quantize
from bbct.kernels.testing import assert_bit_equal, int_arrays

# (B, S, H) = (3, 4, 3): the worked example of docs/KERNELS.md
GOLDEN_X = np.array(
    [
        [[1, -1, 127], [2, -2, 127], [3, -3, 127], [3, -3, 127]],
        [[5, 0, -7], [5, 0, 0], [6, 1, 0], [-128, 50, 100]],
        [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]],
    ]
)
GOLDEN_MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])


def test_mean_pool_hand_golden():
    # s8 in, F = 1, s8 out (SAT). Row 0: n = 4; channel 0: A = 9, 9 * 2 / 4 = 4.5 (2 rem = 4 = n:
    # a tie) -> 4 (RND_CONV, even); channel 1: -4.5 -> -4; channel 2: A = 508, 1016 / 4 = 254
    # saturates to 127 (one event). Row 1: n = 3 (the -128 token is masked): 32 / 3 = 10.67 -> 11,
    # 2 / 3 -> 1, -14 / 3 = -4.67 -> -5. Row 2: no token, n = 0: zeros, as float (0 / 1e-9).
    p = make_mean_pool_params(8, 8, frac_bits=1)
    y, n_sat = mean_pool(GOLDEN_X, GOLDEN_MASK, p)
    assert y.tolist() == [[4, -4, 127], [11, 1, -5], [0, 0, 0]] and n_sat == 1
    assert mean_pool_exp(np.full((3, 1, 3), -6), p).tolist() == [[-7] * 3] * 3  # e - F
    assert mean_pool_exp(np.array([[[-6, EXP_ZERO]]]), p).tolist() == [[-7, EXP_ZERO]]  # a zero channel stays
    # the ties of row 0 under the other modes: 4.5 and -4.5
    ties = {
        Rounding.TRN: [4, -5],
        Rounding.TRN_ZERO: [4, -4],
        Rounding.RND: [5, -4],
        Rounding.RND_ZERO: [4, -4],
        Rounding.RND_INF: [5, -5],
        Rounding.RND_CONV: [4, -4],
    }
    for mode, want in ties.items():
        pm = make_mean_pool_params(8, 8, frac_bits=1, rounding=mode)
        assert mean_pool(GOLDEN_X, GOLDEN_MASK, pm)[0][0, :2].tolist() == want
        assert_bit_equal(mean_pool(GOLDEN_X, GOLDEN_MASK, pm)[0], mean_pool_ref(GOLDEN_X, GOLDEN_MASK, pm)[0])
    # WRAP keeps the low 8 bits of 254: -2
    assert mean_pool(GOLDEN_X, GOLDEN_MASK, make_mean_pool_params(8, 8, 1, saturation="WRAP"))[0][0, 2] == -2
    # the float formula at F = 1 (x 2): 4.5, -4.5, 254; 10.67, 0.67, -4.67; 0, 0, 0
    np.testing.assert_allclose(mean_pool_float(GOLDEN_X, GOLDEN_MASK)[1] * 2, [32 / 3, 2 / 3, -14 / 3])


def test_mean_pool_exhaustive_int8_pairs():
    """Every pair of int8 tokens (65536 rows, S = 2): both unmasked, the mean is round-half-even
    of (a + b) / 2 (numpy's round is half to even), with F = 0 and F = 1 (exact, no rounding);
    one masked, the other token itself."""
    v = np.arange(-128, 128, dtype=np.int64)
    x = np.stack(np.meshgrid(v, v, indexing="ij"), -1).reshape(-1, 2, 1)
    both, first = np.ones((x.shape[0], 2), np.int64), np.tile([1, 0], (x.shape[0], 1))
    p0, p1 = make_mean_pool_params(8, 8, 0), make_mean_pool_params(8, 9, 1)
    s = x[:, 0, 0] + x[:, 1, 0]
    y, n = mean_pool(x, both, p0)
    assert_bit_equal(y[:, 0], np.round(s / 2).astype(np.int64))
    assert n == 0 and int(y.min()) == -128 and int(y.max()) == 127
    assert_bit_equal(mean_pool(x, both, p1)[0][:, 0], s)
    assert_bit_equal(mean_pool(x, first, p0)[0][:, 0], x[:, 0, 0])
    assert_bit_equal(mean_pool_ref(x[::97], both[::97], p0)[0], y[::97])


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(1, 12),
    st.integers(1, 9),
    st.integers(2, 40),
    st.integers(0, 12),
    st.integers(2, 40),
    st.sampled_from(list(Rounding)),
    st.sampled_from(list(Saturation)),
)
@example(None, 2, 5, 3, 32, 0, 32, Rounding.RND_CONV, Saturation.SAT)
def test_mean_pool_twins(data, b, s, h, in_bits, fb, out_bits, mode, sat):
    p = make_mean_pool_params(in_bits, out_bits, fb, mode, sat)
    if data is None:  # pinned: type min / max in every token, a row with its mask all zero
        lo, hi = -(1 << (in_bits - 1)), (1 << (in_bits - 1)) - 1
        x = np.array([[[lo, hi, lo]] * s, [[hi, lo, 0]] * s])
        mask = np.array([[1] * s, [0] * s])
        y, n_sat = mean_pool(x, mask, p)
        assert y.tolist() == [[lo, hi, lo], [0, 0, 0]] and n_sat == 0
        pn = make_mean_pool_params(in_bits, in_bits, 0, mode, Saturation.SAT_SYM)  # -2**31 -> -(2**31 - 1)
        assert mean_pool(x, mask, pn)[0][0].tolist() == [-hi, hi, -hi] and mean_pool(x, mask, pn)[1] == 2
        return
    x = data.draw(int_arrays((b, s, h), in_bits))
    mask = data.draw(int_arrays((b, s), 1, signed=False))
    if data.draw(st.booleans()):
        mask[0] = 0  # a row whose mask is all zero
    a, r = mean_pool(x, mask, p), mean_pool_ref(x, mask, p)
    assert_bit_equal(a[0], r[0])
    assert a[1] == r[1]


@pytest.mark.parametrize(
    "fmt,h,guard",
    [
        (IntFormat(bits=8, block_size=3), 10, 4),  # H-blocks that do not divide H
        (IntFormat(bits=8, block_size=0), 7, 0),  # one exponent per token
        (IntFormat(bits=4, block_size=5), 16, 6),
        (IntFormat(bits=8, block_size=4, scale="MULT", mant_bits=4), 9, 2),
    ],
)
def test_mean_pool_error_vs_float(fmt, h, guard):
    """Inputs as the simulator makes them: float tokens quantized with per-token H-blocks, then
    aligned over the sequence (one exponent per (batch, channel)). Two declared tolerances:
    * against the float formula on the aligned values: half an output step 2**(e - F - 1)
      (the division rounds to nearest once; nothing saturates with the default F);
    * against the unquantized float: plus the largest input error over the tokens (a mean of
      errors is no larger than their maximum): half the block's scale (quantize rounds to
      nearest; ``mant * 2**exp`` for MULT) plus half a step 2**(e - 1) of align's right shift.
    """
    rng = np.random.default_rng(h)
    b, s = 4, 13
    x = rng.normal(size=(b, s, h)) * rng.uniform(0.05, 20, (b, s, 1))
    mask = (rng.uniform(size=(b, s)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    mask[3] = 0  # a sentence with no token: 0
    q = quantize(x, fmt)
    wide, e = align(q, (1,), guard, Rounding.RND_CONV)
    in_bits = int(np.abs(wide).max()).bit_length() + 1  # the aligned codes' signed width
    p = make_mean_pool_params(in_bits, 24)
    y, n_sat = mean_pool(wide, mask, p)
    assert n_sat == 0 and p.frac_bits == 24 - in_bits
    e_out = mean_pool_exp(e, p).astype(np.int64)
    got = y * np.ldexp(1.0, e_out)
    e2 = e[:, 0, :].astype(np.int64)
    aligned = mean_pool_float(wide * np.ldexp(1.0, e.astype(np.int64)), mask)
    assert np.all(np.abs(got - aligned) <= np.ldexp(1.0, e_out - 1))
    half_step = (q.scale_array() / 2).max(axis=1)  # quantize's error: half the token's block scale
    bound = half_step + np.ldexp(1.0, e2 - 1) + np.ldexp(1.0, e_out - 1)
    ref = mean_pool_float(x, mask)
    assert np.all(np.abs(got - ref) <= bound)
    assert np.all(got[3] == 0) and np.all(ref[3] == 0)


def test_mean_pool_errors():
    p = make_mean_pool_params(8)
    x = np.zeros((2, 3, 4), np.int64)
    with pytest.raises(ValueError, match="mask values must be 0 or 1"):
        mean_pool(x, np.full((2, 3), 2), p)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) must be \(B, S\)"):
        mean_pool(x, np.ones((2, 4), np.int64), p)
    with pytest.raises(ValueError, match="must be \\(B, S, H\\)"):
        mean_pool(np.zeros((3, 4), np.int64), np.ones((3, 4), np.int64), p)
    with pytest.raises(ValueError, match="code 200 is outside the signed 8-bit range"):
        mean_pool(x + 200, np.ones((2, 3), np.int64), p)
    with pytest.raises(TypeError, match="integer array expected"):
        mean_pool(x.astype(float), np.ones((2, 3), np.int64), p)
    big = make_mean_pool_params(50, 62, 10)  # 50 + bitlen(8) + 10 = 64 > 62
    with pytest.raises(ValueError, match="exceeds 62"):
        mean_pool(np.zeros((1, 8, 1), np.int64), np.ones((1, 8), np.int64), big)
    with pytest.raises(ValueError, match="one exponent shared along S"):
        mean_pool_exp(np.zeros((2, 3, 4), np.int64), p)
    with pytest.raises(ValueError, match="mean_pool: rounding='NEAREST' is not one of TRN"):
        make_mean_pool_params(8, rounding="NEAREST")
    with pytest.raises(ValueError, match="mean_pool: saturation='CLIP'"):
        make_mean_pool_params(8, saturation="CLIP")
    with pytest.raises(ValueError, match="frac_bits=-1"):
        make_mean_pool_params(8, 16, -1)
    assert p.to_dict() == {"in_bits": 8, "frac_bits": 8, "out_bits": 16, "rounding": "RND_CONV", "saturation": "SAT"}
    assert make_mean_pool_params(8, 8, 0, "trn", "wrap").to_dict()["rounding"] == "TRN"
    for pm in (make_mean_pool_params(40, 20), make_mean_pool_params(3, 8, 5, "RND_INF", "SAT_SYM")):
        d = json.loads(json.dumps(pm.to_dict()))
        assert make_mean_pool_params(d["in_bits"], d["out_bits"], d["frac_bits"], d["rounding"], d["saturation"]) == pm
