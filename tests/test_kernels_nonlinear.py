"""GELU, softmax, LayerNorm, tanh, isqrt: exhaustive and hypothesis twins, float error bounds."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernels.gelu import gelu_float, gelu_lut, gelu_lut_ref, gelu_poly, gelu_poly_ref, make_gelu_lut, make_gelu_poly
from kernels.layernorm import isqrt, isqrt_ref, layernorm, layernorm_ref, make_layernorm_params
from kernels.softmax import make_softmax_params, softmax, softmax_ref
from kernels.tanh import make_tanh_lut, tanh_lut, tanh_lut_ref
from kernels.testing import assert_bit_equal, int_arrays

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT16 = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)  # the whole 16-bit input domain


@pytest.mark.parametrize("e_in", [-9, -11])
def test_gelu_poly_exhaustive_int16(e_in):
    p = make_gelu_poly(e_in, in_bits=16, out_bits=16)
    y = gelu_poly(INT16, p)
    assert_bit_equal(y, gelu_poly_ref(INT16, p))
    err = np.abs(y * 2.0**p.e_out - gelu_float(INT16 * 2.0**e_in)).max()
    # I-BERT's i-GELU reports 1.8e-2; the refitted polynomial alone is 1.45e-2, plus half an
    # output step (2**e_in / 2) and the coefficient rounding
    assert err < 1.45e-2 + 2.0 ** (e_in - 1) + 1e-3, err


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("addr_bits", [6, 8])
def test_gelu_lut_exhaustive_int16(approximate, addr_bits):
    e_in = -11
    p = make_gelu_lut(e_in, 16, addr_bits, 16, approximate)
    y = gelu_lut(INT16, p)
    assert_bit_equal(y, gelu_lut_ref(INT16, p))
    err = np.abs(y * 2.0**p.e_out - gelu_float(INT16 * 2.0**e_in, approximate)).max()
    # linear interpolation: h**2/8 * max|GELU''| (0.8) with h = 8 / 2**addr_bits, plus 1.5 output steps
    bound = (8 / 2**addr_bits) ** 2 / 8 * 0.8 + 1.5 * 2.0**e_in + 1.4e-4
    assert err < bound, (err, bound)
    assert len(p.table) == 2**addr_bits + 1


def test_gelu_hand_golden():
    # e_in = -10: x = 1024 is 1.0, t = x/sqrt(2) = 0.70711 < c = 1.83;
    # erf ~ 1 + A (t - c)**2 = 1 - 0.258 * 1.26088 = 0.67469 (true erf 0.68269);
    # GELU ~ 0.5 * 1.67469 = 0.83734 -> 857.4 * 2**-10 -> 857 (true GELU(1) = 0.84134).
    # GELU(0) = 0; x = -8: the clip makes erf = -1 exactly, so GELU = 0.
    p = make_gelu_poly(-10)
    assert gelu_poly(np.array([1024, 0, -8192]), p).tolist() == [857, 0, 0]


def test_tanh_lut_exhaustive_int16():
    p = make_tanh_lut(-12, 16, 10, 16)
    y = tanh_lut(INT16, p)
    assert_bit_equal(y, tanh_lut_ref(INT16, p))
    assert np.abs(y * 2.0**p.e_out - np.tanh(INT16 * 2.0**-12)).max() < 1e-4
    # +1.0 saturates to 32767 * 2**-15; -1.0 is exactly -32768 * 2**-15
    assert y.max() == 2**15 - 1 and y.min() == -(2**15)


def test_softmax_exp_exhaustive_int16():
    # every score difference d in [-2**16, 0] of a two-element row [0, d]: the poly exp
    p = make_softmax_params(-9, in_bits=18, out_bits=16)
    d = np.arange(-(1 << 16), 1, dtype=np.int64)
    x = np.stack([np.zeros_like(d), d], 1)
    y = softmax(x, np.zeros((1, 2), np.int64), p)
    assert_bit_equal(y, softmax_ref(x, np.zeros((1, 2), np.int64), p))
    f = 1 / (1 + np.exp(d * 2.0**-9))
    assert np.abs(y[:, 0] * 2.0**-16 - f).max() < 1.5e-3


@SETTINGS
@given(st.data(), st.integers(1, 6), st.integers(1, 70), st.sampled_from(["poly", "lut"]), st.sampled_from([8, 16]))
def test_softmax_twins(data, rows, n, method, out_bits):
    p = make_softmax_params(-9, in_bits=18, out_bits=out_bits, method=method)
    x = data.draw(int_arrays((rows, n), 18))
    keep = data.draw(int_arrays((rows, n), 1, signed=False, edges=False))
    mask = np.where(keep == 1, 0, -(1 << 17))
    assert_bit_equal(softmax(x, mask, p), softmax_ref(x, mask, p))


@pytest.mark.parametrize("method,out_bits,bound", [("poly", 16, 1.9e-3), ("lut", 16, 5e-4), ("poly", 8, 5.5e-3)])
def test_softmax_error_vs_float(method, out_bits, bound):
    """I-BERT reports 1.9e-3 for its softmax; at 16 output bits both methods do better."""
    rng = np.random.default_rng(0)
    p = make_softmax_params(-9, 18, out_bits, method)
    x = np.round(rng.normal(size=(400, 64)) * rng.uniform(0.1, 12, (400, 1)) / 2**-9).astype(np.int64)
    mask = np.zeros((400, 64), np.int64)
    mask[:100, 30:] = -(1 << 17)
    y = softmax(x, mask, p) * 2.0**p.e_out
    xf = np.where(mask < 0, -np.inf, x * 2.0**-9)
    f = np.exp(xf - xf.max(-1, keepdims=True))
    f /= f.sum(-1, keepdims=True)
    assert np.abs(y - f).max() < bound


def test_softmax_hand_golden_and_masked_rows():
    # [0, 0] -> exp 1, 1 -> 0.5 each: 128 of 256 at u8; a masked key gets 0, its partner 255 (1.0 saturates)
    p = make_softmax_params(-9, 18, 8)
    y = softmax(np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, -(1 << 17)]]), p)
    assert y.tolist() == [[128, 128], [255, 0]]
    # a fully masked row is uniform, not a division by zero
    y = softmax(np.array([[5, 5, 5, 5]]), np.full((1, 4), -(1 << 17)), p)
    assert y.tolist() == [[64, 64, 64, 64]]


def test_isqrt_exhaustive_and_random():
    n = np.arange(0, 1 << 16)
    assert all(isqrt(int(v)) == math.isqrt(int(v)) == isqrt_ref(int(v)) for v in n)
    rng = np.random.default_rng(0)
    for v in list(rng.integers(0, 1 << 62, 2000)) + [(1 << 62) - 1, (1 << 60), (1 << 61) + 1]:
        assert isqrt(int(v)) == math.isqrt(int(v)) == isqrt_ref(int(v))


@SETTINGS
@given(st.data(), st.integers(1, 5), st.integers(1, 48), st.integers(2, 22))
@example(None, 1, 1, 2)
def test_layernorm_twins(data, rows, h, bits):
    if data is None:
        return
    rng = np.random.default_rng(h)
    p = make_layernorm_params(rng.normal(1, 0.5, h), rng.normal(0, 0.3, h), 1e-5)
    x = data.draw(int_arrays((rows, h), bits))
    e = data.draw(int_arrays((rows, 1), 5))
    assert_bit_equal(layernorm(x, e, p), layernorm_ref(x, e, p))


def test_layernorm_error_vs_float_and_edge_rows():
    rng = np.random.default_rng(0)
    h = 384
    g, b = rng.normal(1, 0.3, h), rng.normal(0, 0.2, h)
    p = make_layernorm_params(g, b, 1e-12)
    x = np.round(rng.normal(size=(64, h)) * rng.uniform(0.5, 50, (64, 1)) * 2**12).astype(np.int64)
    x[0] = 7  # a constant row: variance 0, normalized 0, output beta
    e = np.full((64, 1), -16)
    y = layernorm(x, e, p) * 2.0**p.e_out
    xf = x * 2.0**-16
    f = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-12) * g + b
    # output step 2**e_out (e_out = -9 here) bounds the error: half a step plus normalization error
    assert p.e_out == -9
    assert np.abs(y - f).max() < 2.0**p.e_out
    np.testing.assert_allclose(y[0], b, atol=2.0**p.e_out)
    with pytest.raises(ValueError, match="would overflow the int64 variance"):
        layernorm(np.full((1, h), 1 << 40), np.zeros((1, 1), np.int64), p)
