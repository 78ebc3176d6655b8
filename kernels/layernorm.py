"""LayerNorm in integer arithmetic, with a bit-exact integer square root.

Input: rows ``x`` (int64, ``(..., H)``) with one exponent per row ``e_row`` (value
``x * 2**e_row``, e.g. a residual sum aligned by :func:`kernels.align.align`). Per row:

1. ``S = sum(x)``; ``mu = round(S / H)`` (floor((2S + H) / 2H): half up)        int64
2. ``d = x - mu``; ``V = sum(d*d)``   (checked: ``max|d|**2 * H < 2**62``)      int64
3. eps in the variance's units: ``V += (H * EPS_M) >>RND (2*e_row - EPS_E)`` where
   ``eps = EPS_M * 2**EPS_E`` (a 24-bit mantissa; left shifts saturate at 2**62)
4. ``t = max(0, (61 - bitlen(V)) // 2)``; ``W = (V << 2t) // H``; ``sigma = isqrt(W)``:
   ``sigma ~= std * 2**t`` in input units (std = sqrt(V / H))
5. one reciprocal per row: ``R = 2**RB // sigma`` (RB = 40); ``n = (d * R) >>RND
   (RB - FN - t)``: the normalized value in Q.FN (FN = 12); sigma = 0 gives n = 0
6. ``y = sat_out((n * GAMMA + BETA) >>RND (e_out - e_gamma + FN))``: gamma as
   ``gamma_bits``-bit codes at exponent ``e_gamma``, beta at ``e_gamma - FN``

``isqrt`` is the digit-by-digit (restoring, base 4) method: one result bit per step,
``floor(sqrt(n))`` exactly for 0 <= n < 2**62 — the shift/subtract loop an RTL block uses.
LayerNorm is scale-invariant, so ``e_row`` only places eps. The output exponent
``e_out`` is fixed at lowering from ``max|gamma| * sqrt(H) + max|beta|`` (the largest a
normalized value times gamma can be), so step 6 never saturates for valid input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from kernels.formats import int_range, require_int, saturate, saturate_ref, shift_round, shift_round_ref

FN = 12
RB = 40
RND = 2
EPS_BITS = 24
LIMIT = 1 << 62


@nb.njit(cache=True)
def isqrt(n: np.int64) -> np.int64:
    """floor(sqrt(n)) for 0 <= n < 2**62, digit by digit (restoring, two bits of n per step)."""
    res = np.int64(0)
    bit = np.int64(1) << 60
    while bit > n:
        bit >>= 2
    while bit != 0:
        if n >= res + bit:
            n -= res + bit
            res = (res >> 1) + bit
        else:
            res >>= 1
        bit >>= 2
    return res


def isqrt_ref(n: int) -> int:
    """Plain-Python twin of :func:`isqrt` (the same digit-by-digit loop, Python ints)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"isqrt of negative {n}")
    res, bit = 0, 1 << 60
    while bit > n:
        bit >>= 2
    while bit:
        if n >= res + bit:
            n -= res + bit
            res = (res >> 1) + bit
        else:
            res >>= 1
        bit >>= 2
    return res


@dataclass(frozen=True, eq=False)
class LayerNormParams:
    gamma: np.ndarray  # int64 codes, gamma_bits wide, at exponent e_gamma
    beta: np.ndarray  # int64 at exponent e_gamma - FN
    e_gamma: int
    eps_m: int
    eps_e: int
    e_out: int
    out_bits: int
    gamma_bits: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}


def make_layernorm_params(
    gamma: np.ndarray, beta: np.ndarray, eps: float, gamma_bits: int = 16, out_bits: int = 16
) -> LayerNormParams:
    """Integer gamma/beta/eps and the output exponent (float math here only)."""
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    if gamma.shape != beta.shape or gamma.ndim != 1:
        raise ValueError(f"layernorm: gamma {gamma.shape} and beta {beta.shape} must be equal 1-D shapes")
    qmax = (1 << (gamma_bits - 1)) - 1
    gmax = float(np.max(np.abs(gamma))) or 1.0
    e_gamma = math.ceil(math.log2(gmax / qmax))
    g_q = np.clip(np.round(gamma / 2.0**e_gamma), -qmax, qmax).astype(np.int64)
    b_q = np.round(beta / 2.0 ** (e_gamma - FN)).astype(np.int64)
    if eps > 0:
        m, e = math.frexp(eps)
        eps_m, eps_e = round(m * (1 << EPS_BITS)), e - EPS_BITS
    else:
        eps_m, eps_e = 0, 0
    bound = gmax * math.sqrt(len(gamma)) + float(np.max(np.abs(beta)))
    e_out = math.ceil(math.log2(bound / ((1 << (out_bits - 1)) - 1)))
    return LayerNormParams(
        gamma=g_q,
        beta=b_q,
        e_gamma=e_gamma,
        eps_m=eps_m,
        eps_e=eps_e,
        e_out=e_out,
        out_bits=out_bits,
        gamma_bits=gamma_bits,
    )


@nb.njit(cache=True)
def _bitlen(v):
    n = np.int64(0)
    while v > 0:
        v >>= 1
        n += 1
    return n


@nb.njit(cache=True)
def _ln_rows(x, e_row, gamma, beta, e_gamma, eps_m, eps_e, e_out, lo, hi, bits, out):
    rows, h = x.shape
    d = np.empty(h, np.int64)
    for r in range(rows):
        s = np.int64(0)
        for j in range(h):
            s += x[r, j]
        mu = (2 * s + h) // (2 * h)
        v = np.int64(0)
        for j in range(h):
            d[j] = x[r, j] - mu
            v += d[j] * d[j]
        sh = 2 * e_row[r] - eps_e
        ee = h * eps_m
        if sh >= 0:
            v += shift_round(ee, min(sh, 62), RND)
        elif sh > -(62 - _bitlen(ee)):
            v += ee << (-sh)
        else:
            v = LIMIT
        if v > LIMIT:
            v = LIMIT
        t = max(0, (61 - _bitlen(v)) // 2)
        sigma = isqrt((v << (2 * t)) // h)
        recip = (np.int64(1) << RB) // sigma if sigma > 0 else np.int64(0)
        for j in range(h):
            n = shift_round(d[j] * recip, RB - FN - t, RND)
            y = shift_round(n * gamma[j] + beta[j], e_out - e_gamma + FN, RND)
            out[r, j] = saturate(y, lo, hi, False, bits)


def _setup(x, e_row, p):
    x = require_int("layernorm: x", x).astype(np.int64, copy=False)
    e_row = require_int("layernorm: e_row", e_row)
    h = x.shape[-1]
    if p.gamma.shape != (h,):
        raise ValueError(f"layernorm: x has {h} channels, gamma has {p.gamma.shape[0]}")
    xr = np.ascontiguousarray(x).reshape(-1, h)
    try:
        er = np.ascontiguousarray(np.broadcast_to(e_row, x.shape[:-1] + (1,))).reshape(-1).astype(np.int64)
    except ValueError:
        raise ValueError(f"layernorm: e_row shape {e_row.shape} does not match rows of {x.shape}") from None
    if xr.size:
        # |d| <= 2 max|x|: d*d*H must stay below 2**62
        m = int(np.max(np.abs(xr)))
        if (2 * m) ** 2 * h >= LIMIT:
            raise ValueError(
                f"layernorm: inputs up to {m} with H={h} would overflow the int64 variance; "
                f"narrow the input to below {math.isqrt(LIMIT // h) // 2}"
            )
    return xr, er


def layernorm(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> np.ndarray:
    """Numba kernel; int64 codes of ``p.out_bits`` at exponent ``p.e_out``, x's shape."""
    xr, er = _setup(x, e_row, p)
    lo, hi = int_range(p.out_bits, True)
    out = np.empty(xr.shape, np.int64)
    _ln_rows(xr, er, p.gamma, p.beta, p.e_gamma, p.eps_m, p.eps_e, p.e_out, lo, hi, p.out_bits, out)
    return out.reshape(np.shape(x))


def layernorm_ref(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> np.ndarray:
    """Plain-Python twin of :func:`layernorm`."""
    xr, er = _setup(x, e_row, p)
    h = xr.shape[1]
    out = np.empty(xr.shape, np.int64)
    for r in range(xr.shape[0]):
        row = [int(v) for v in xr[r]]
        s = sum(row)
        mu = (2 * s + h) // (2 * h)
        d = [v - mu for v in row]
        v = sum(a * a for a in d)
        sh = 2 * int(er[r]) - p.eps_e
        v += shift_round_ref(h * p.eps_m, min(sh, 62), RND)  # exact Python int for left shifts
        v = min(v, LIMIT)
        t = max(0, (61 - v.bit_length()) // 2)
        sigma = isqrt_ref((v << (2 * t)) // h)
        recip = (1 << RB) // sigma if sigma else 0
        for j in range(h):
            n = shift_round_ref(d[j] * recip, RB - FN - t, RND)
            y = shift_round_ref(n * int(p.gamma[j]) + int(p.beta[j]), p.e_out - p.e_gamma + FN, RND)
            out[r, j] = saturate_ref(y, p.out_bits, True, 0)[0]
    return out.reshape(np.shape(x))
