"""L2 normalization: a hand golden, exhaustive over pairs of int8 codes, kernel equal to its
reference, the stated error bound against float (torch's normalize), eps and errors."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bbct.kernels.formats import EXP_ZERO, Rounding
from bbct.kernels.l2norm import NO_EPS, l2_normalize, l2_normalize_float, l2_normalize_ref, make_l2norm_params
from bbct.kernels.layernorm import isqrt
from bbct.kernels.testing import assert_bit_equal, int_arrays


def _bound_codes(p) -> float:
    """The module's bound in output codes: half a code (a whole one for TRN modes) + 2**(FO - 29)."""
    fo = p.out_bits - 2
    final = 1.0 if p.rounding in (Rounding.TRN, Rounding.TRN_ZERO) else 0.5
    return final + 2.0 ** (fo - 29)


def test_l2_normalize_hand_golden():
    # out_bits = 16: FO = 14, e_out = -14 (16384 is 1.0). Row [3, 4], norm 5:
    # V = 25 (5 bits), t = (61 - 5) // 2 = 28, sigma = isqrt(25 << 56) = 5 * 2**28 = 1342177280 (exact),
    # R = 2**60 // sigma = 2**32 // 5 = 858993459, shift 60 - 28 - 14 = 18:
    # 3 R / 2**18 = 9830.39999 -> 9830 (0.6 * 16384 = 9830.4), 4 R / 2**18 = 13107.19998 -> 13107.
    # Row [1, 1]: V = 2, t = 29, sigma = isqrt(2**59) = 759250124, R = 1518500251,
    # R / 2**17 = 11585.24 -> 11585 (16384 / sqrt 2 = 11585.24). Row [0, -7]: -1.0 exactly, -16384.
    # Row [0, 0]: all zero, output 0 (float: 0 / max(0, eps) = 0).
    p = make_l2norm_params(1e-12, 16)
    assert (p.e_out, p.e_min) == (-14, -39)
    assert isqrt(25 << 56) == 5 << 28 and (1 << 60) // (5 << 28) == 858993459
    assert isqrt(1 << 59) == 759250124 and (1 << 60) // 759250124 == 1518500251
    x = np.array([[3, 4], [1, 1], [0, -7], [0, 0]])
    y, n_sat = l2_normalize(x, np.array([[0], [0], [0], [EXP_ZERO]]), p)
    assert y.tolist() == [[9830, 13107], [11585, 11585], [0, -16384], [0, 0]] and n_sat == 0


def test_l2_normalize_exhaustive_int8_pairs():
    """Every pair of int8 codes as a row (H = 2, 65536 rows): kernel == reference, within the
    bound of float, a one-hot row exactly +-1.0."""
    v = np.arange(-128, 128, dtype=np.int64)
    x = np.stack(np.meshgrid(v, v, indexing="ij"), -1).reshape(-1, 2)
    e = np.zeros((x.shape[0], 1), np.int64)
    for bits, mode in ((16, Rounding.RND_CONV), (9, Rounding.TRN)):
        p = make_l2norm_params(1e-12, bits, mode)
        y, n_sat = l2_normalize(x, e, p)
        assert_bit_equal(y, l2_normalize_ref(x, e, p)[0])
        err = np.abs(y - l2_normalize_float(x, e) * 2.0**-p.e_out).max()
        assert n_sat == 0 and err < _bound_codes(p), err
        one_hot = (x[:, 0] == 0) & (x[:, 1] != 0)
        if mode == Rounding.RND_CONV:  # +-1.0 exactly (TRN floors k * floor(2**60 / k) below 2**60)
            assert_bit_equal(y[one_hot, 1], np.sign(x[one_hot, 1]) << (bits - 2))


@pytest.mark.parametrize(
    "h,bits,out_bits,mode",
    [(384, 16, 16, Rounding.RND_CONV), (768, 26, 24, Rounding.RND), (7, 8, 8, Rounding.TRN), (1, 30, 32, Rounding.RND)],
)
def test_l2_normalize_error_vs_float(h, bits, out_bits, mode):
    """Declared tolerance, in output codes: 1/2 + 2**(FO - 29) (TRN: 1 + ...), from the
    module docstring's derivation (floor of sigma, floor of the reciprocal, the final shift).
    Rows at every scale, one-hot rows, a dominant element plus small ones, the widest codes."""
    rng = np.random.default_rng(h + bits)
    p = make_l2norm_params(1e-12, out_bits, mode)
    hi = (1 << (bits - 1)) - 1
    x = np.round(rng.normal(size=(64, h)) * rng.uniform(1e-4, 0.4, (64, 1)) * hi).astype(np.int64)
    x[0] = 0
    x[0, h // 2] = -hi - 1  # one-hot at the type minimum: exactly -1.0
    x[1] = 1  # the smallest nonzero norm with every element set
    x[2] = hi  # the largest sum of squares
    x[3] = 0
    x[3, 0] = hi  # a dominant element, small neighbours
    x[3, 1:] = rng.integers(-3, 4, h - 1)
    e = rng.integers(-30, 10, (64, 1))
    y, n_sat = l2_normalize(x, e, p)
    err = np.abs(y - l2_normalize_float(x, e) * 2.0**-p.e_out).max()
    assert n_sat == 0 and err < _bound_codes(p), (err, _bound_codes(p))
    assert y[0, h // 2] == -(1 << (out_bits - 2))
    assert_bit_equal(y[:8], l2_normalize_ref(x[:8], e[:8], p)[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 5), st.integers(1, 48), st.integers(3, 32), st.sampled_from(list(Rounding)))
@example(data=None, rows=3, h=5, out_bits=16, mode=Rounding.RND_CONV)
def test_l2_normalize_twins(data, rows, h, out_bits, mode):
    p = make_l2norm_params(1e-12, out_bits, mode)
    bits = (62 - h.bit_length()) // 2  # the widest codes the bound allows
    if data is None:  # pinned: type min / max rows at the bound, an all-zero row at EXP_ZERO
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        x = np.array([[lo] * h, [hi] * h, [0] * h, [lo, hi, 0, 1, -1]])
        e = np.array([[-39], [0], [EXP_ZERO], [5]])
    else:
        x = data.draw(int_arrays((rows, h), data.draw(st.integers(1, bits))))
        e = data.draw(int_arrays((rows, 1), 6)) - 7  # -39..24: at or above e_min
    a, r = l2_normalize(x, e, p), l2_normalize_ref(x, e, p)
    assert_bit_equal(a[0], r[0])
    assert a[1] == r[1] == 0


def test_l2_normalize_eps_and_errors():
    # eps becomes the smallest row exponent at which a nonzero row's norm (>= 2**e_row) >= eps
    assert make_l2norm_params(1e-12).e_min == math.ceil(math.log2(1e-12)) == -39
    assert make_l2norm_params(2.0**-40).e_min == -40  # a power of two: ceil(log2) is exact
    assert make_l2norm_params(0.0).e_min == NO_EPS
    p = make_l2norm_params(1e-12)
    with pytest.raises(ValueError, match="row 1 is nonzero at exponent -40 < e_min=-39"):
        l2_normalize(np.array([[0, 0], [0, 1]]), np.array([[-50], [-40]]), p)
    # an all-zero row at any exponent is fine, and without eps any exponent is
    assert l2_normalize(np.array([[0, 0]]), np.array([[-50]]), p)[0].tolist() == [[0, 0]]
    assert l2_normalize(np.array([[0, 3]]), np.array([[-900]]), make_l2norm_params(0.0))[0].tolist() == [[0, 16384]]
    with pytest.raises(ValueError, match="would overflow the int64 sum of squares"):
        l2_normalize(np.full((1, 4), 1 << 30), np.zeros((1, 1), np.int64), p)
    with pytest.raises(TypeError, match="integer array expected"):
        l2_normalize(np.zeros((1, 4)), np.zeros((1, 1), np.int64), p)
    with pytest.raises(ValueError, match="does not broadcast"):
        l2_normalize(np.zeros((2, 4), np.int64), np.zeros((3, 1), np.int64), p)
    with pytest.raises(ValueError, match="out_bits=2 must be"):
        make_l2norm_params(1e-12, 2)
    with pytest.raises(ValueError, match="l2_normalize: rounding='HALF' is not one of"):
        make_l2norm_params(1e-12, 16, "HALF")
    assert make_l2norm_params(1e-12, 16, "rnd").rounding == Rounding.RND
    with pytest.raises(ValueError, match="eps=-1"):
        make_l2norm_params(-1.0)
    assert p.to_dict() == {"out_bits": 16, "e_out": -14, "e_min": -39, "rounding": "RND_CONV"}
    # leading axes: (B, S, H) rows with e_row broadcast from (B, 1, 1)
    x = np.arange(2 * 3 * 5).reshape(2, 3, 5) - 7
    e = np.array([[[-3]], [[2]]])
    assert_bit_equal(l2_normalize(x, e, p)[0], l2_normalize_ref(x, e, p)[0])
