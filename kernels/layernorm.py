"""LayerNorm in integer arithmetic, with a bit-exact integer square root.

Input: rows ``x`` (int64, ``(..., H)``) with one exponent per row ``e_row`` (value
``x * 2**e_row``, e.g. a residual sum aligned by :func:`bbct.kernels.align.align`). Per row
(``>>RND`` rounds half up; every intermediate is int64, bounds below)::

    0. b  = bitlen(max|x_row|);  M = (59 - bitlen(H) - 2b) // 2      mean fraction bits (>= 0)
    1. S  = sum(x)                                   |S| < H * 2**b
       mu = floor((S * 2**(M+1) + H) / 2H)          the mean in Q.M, rounded half up (one division)
    2. d  = (x << M) - mu;  V = sum(d*d)             V = H * variance, in units 2**(2 (e_row - M))
    3. V += (H * EPS_M) >>RND (2 (e_row - M) - EPS_E)   eps = EPS_M * 2**EPS_E (24-bit mantissa),
                                                     a left shift if negative; V saturates at 2**62-1
    4. t  = max(0, (61 - bitlen(V)) // 2)            normalize V to ~61 bits (a leading-zero count)
       W  = (V << 2t) // H;  sigma = isqrt(W)        sigma = floor(sqrt(V/H) * 2**t)
    5. R  = floor(2**RB / sigma)  (RB = 48)          one reciprocal per row; sigma = 0 gives R = 0
       n  = (d * R) >>RND (RB - FN - t)              (x - mean) / std in Q.FN (FN = norm_frac_bits)
    6. y  = sat_out(((n * GAMMA) >>RND (e_out - e_gamma + FN)) + BETA)
                                                     GAMMA: gamma_bits codes at e_gamma (per tensor),
                                                     BETA: codes at e_out; SAT to out_bits

Step 0 gives the mean as many fraction bits as the row's headroom allows (a leading-zero
count of the row's max-abs, as a block-exponent unit computes), so rounding the mean never
costs accuracy: ``|d| < 2**(b + 1 + M)`` and ``V < H * 2**(2b + 2 + 2M) <= 2**61``.

Bounds (checked at run time, ValueError): ``M >= 0``, i.e. ``2 * bitlen(max|x|) + bitlen(H)
<= 59`` — inputs up to 24 magnitude bits (25-bit signed) for H = 384..1023, 25 bits for
H = 128..255 — and ``H < 2**20``. ``|n| <= sqrt(H) * 2**FN`` (a normalized value never exceeds
sqrt(H - 1)), so ``d * R < sqrt(H) * 2**(RB + 1) < 2**62``; ``n * GAMMA < 2**(FN + 10 + gamma_bits)``.

``isqrt`` is the digit-by-digit (restoring, base 4) method: one result bit per step,
``floor(sqrt(n))`` exactly for 0 <= n < 2**62 — the shift/compare/subtract loop of an RTL
square-root block. LayerNorm is scale-invariant, so ``e_row`` only places eps. A constant
row has V = 0 (plus eps): n = 0, y = BETA. The output exponent ``e_out`` is fixed at
lowering from ``max|gamma| * sqrt(H) + max|beta|`` unless given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.blockshift import shift_consts, shift_el
from bbct.kernels.formats import int_range, require_int, saturate_ref, shift_round, shift_round_ref

RB = 48
RND = 2  # Rounding.RND: half up
EPS_BITS = 24
LIMIT = 1 << 62
MAX_H = 1 << 20


@nb.njit(cache=True)
def isqrt(n: np.int64) -> np.int64:
    """floor(sqrt(n)) for 0 <= n < 2**62 (Numba scalar), digit by digit: the restoring
    base-4 method, two bits of ``n`` and one result bit per step (31 steps at most).
    Negative ``n`` returns 0."""
    if n <= 0:
        return np.int64(0)
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
    if not 0 <= n < LIMIT:
        raise ValueError(f"isqrt: n={n} must be in 0..2**62-1")
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
    """Integer parameters of :func:`layernorm`.

    Attributes:
        gamma: int64 codes, signed ``gamma_bits`` wide, at exponent ``e_gamma`` (per tensor).
        beta: int64 codes at the output exponent ``e_out`` (saturated to ``out_bits``).
        eps_m, eps_e: eps = eps_m * 2**eps_e (eps_m has ``EPS_BITS`` = 24 bits, 0 if eps = 0).
        norm_frac_bits: FN, fraction bits of the normalized value ``n``.
        e_out, out_bits: output exponent and signed width.
    """

    gamma: np.ndarray
    beta: np.ndarray
    e_gamma: int
    gamma_bits: int
    eps_m: int
    eps_e: int
    norm_frac_bits: int
    e_out: int
    out_bits: int

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (gamma/beta as lists: vector dumps write them as files)."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}


def make_layernorm_params(
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float,
    gamma_bits: int = 16,
    norm_frac_bits: int = 14,
    out_exp: int | None = None,
    out_bits: int = 16,
) -> LayerNormParams:
    """Lower LayerNorm's float gamma/beta/eps to integers (float math here only).

    gamma: ``gamma_bits`` codes at the per-tensor exponent that fits ``max|gamma|`` (RND to
    nearest, SAT_SYM); beta: rounded to ``out_exp`` and saturated to ``out_bits``.
    ``out_exp=None`` picks the smallest exponent at which ``max|gamma| * sqrt(H) +
    max|beta|`` (the largest possible output) fits ``out_bits``.
    """
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    if gamma.shape != beta.shape or gamma.ndim != 1 or gamma.size == 0:
        raise ValueError(f"layernorm: gamma {gamma.shape} and beta {beta.shape} must be equal non-empty 1-D shapes")
    if not np.all(np.isfinite(gamma)) or not np.all(np.isfinite(beta)):
        raise ValueError("layernorm: gamma and beta must be finite")
    if not 2 <= gamma_bits <= 24:
        raise ValueError(f"layernorm: gamma_bits={gamma_bits} must be in 2..24")
    if not 0 <= norm_frac_bits <= 20:
        raise ValueError(f"layernorm: norm_frac_bits={norm_frac_bits} must be in 0..20")
    if not 2 <= out_bits <= 32:
        raise ValueError(f"layernorm: out_bits={out_bits} must be in 2..32")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"layernorm: eps={eps} must be finite and >= 0")
    h = gamma.size
    if h >= MAX_H:
        raise ValueError(f"layernorm: H={h} must be below {MAX_H}")
    qmax = (1 << (gamma_bits - 1)) - 1
    gmax = float(np.max(np.abs(gamma))) or 1.0
    e_gamma = math.ceil(math.log2(gmax / qmax))
    g_q = np.clip(np.round(gamma / 2.0**e_gamma), -qmax, qmax).astype(np.int64)
    if eps > 0:
        m, e = math.frexp(eps)
        eps_m, eps_e = round(m * (1 << EPS_BITS)), e - EPS_BITS
    else:
        eps_m, eps_e = 0, 0
    if out_exp is None:
        bound = gmax * math.sqrt(h) + float(np.max(np.abs(beta)))
        out_exp = math.ceil(math.log2(bound / ((1 << (out_bits - 1)) - 1)))
    lo, hi = int_range(out_bits, True)
    b_q = np.clip(np.round(beta / 2.0**out_exp), lo, hi).astype(np.int64)
    if out_exp - e_gamma + norm_frac_bits < 0:
        raise ValueError(f"layernorm: out_exp={out_exp} is finer than gamma's exponent allows")
    return LayerNormParams(
        gamma=g_q,
        beta=b_q,
        e_gamma=int(e_gamma),
        gamma_bits=gamma_bits,
        eps_m=int(eps_m),
        eps_e=int(eps_e),
        norm_frac_bits=norm_frac_bits,
        e_out=int(out_exp),
        out_bits=out_bits,
    )


@nb.njit(cache=True)
def _eps_add(v, h, e_row, eps_m, eps_e):
    """(V + (H * EPS_M) >>RND (2 e_row - EPS_E) saturated at 2**62 - 1, saturated?) for
    V < 2**62 on entry."""
    ee = h * eps_m
    sh = 2 * e_row - eps_e
    if ee == 0:
        return v, False
    if sh > 62:
        return v, False  # H * EPS_M < 2**44: a right shift by more than 62 leaves 0
    if sh >= 0:
        v = v + shift_round(ee, sh, RND)
    elif bit_len(ee) - sh > 62:
        return np.int64(LIMIT - 1), True
    else:
        v = v + (ee << (-sh))  # each term < 2**62: no int64 overflow
    return (v, False) if v < LIMIT else (np.int64(LIMIT - 1), True)


@nb.njit(cache=True, inline="always")
def bit_len(v):
    n = np.int64(0)
    while v > 0:
        v >>= 1
        n += 1
    return n


@nb.njit(cache=True)
def _ln_rows(x, e_row, gamma, beta, e_gamma, eps_m, eps_e, fn, e_out, lo, hi, bits, out):
    """The module docstring's steps per row of ``x`` (rows, h). Returns (events, max, min)
    with max/min over ``x`` and 0, for the caller's overflow check (made after the rows: a
    row beyond the bound is skipped, its output left unwritten). The final two roundings are
    branch-free (:func:`shift_el`, the same values as ``shift_round`` for shifts up to 62)."""
    rows, h = x.shape
    d = np.empty(h, np.int64)
    hb = bit_len(np.int64(h))
    events = np.int64(0)
    gmx = np.int64(0)
    gmn = np.int64(0)
    k2 = shift_consts(e_out - e_gamma + fn, RND)
    for r in range(rows):
        xr = x[r]
        s = np.int64(0)
        mx = np.int64(0)
        mn = np.int64(0)
        for j in range(h):
            v = np.int64(xr[j])
            s += v
            mx = max(mx, v)
            mn = min(mn, v)
        gmx = max(gmx, mx)
        gmn = min(gmn, mn)
        amax = max(mx, -mn)
        if 2 * bit_len(amax) + hb > 59:  # beyond the int64 variance: the caller raises
            continue
        m = (59 - hb - 2 * bit_len(amax)) // 2
        mu = ((s << (m + 1)) + h) // (2 * h)
        v = np.int64(0)
        for j in range(h):
            dj = (np.int64(xr[j]) << m) - mu
            d[j] = dj
            v += dj * dj
        v, clamped = _eps_add(v, h, e_row[r] - m, eps_m, eps_e)
        if clamped:
            events += 1
        t = max(0, (61 - bit_len(v)) // 2)
        sigma = isqrt((v << (2 * t)) // h)
        recip = (np.int64(1) << RB) // sigma if sigma > 0 else np.int64(0)
        k1 = shift_consts(RB - fn - t, RND)
        orow = out[r]
        for j in range(h):
            y = shift_el(shift_el(d[j] * recip, k1) * gamma[j], k2) + beta[j]
            ys = min(max(y, lo), hi)
            orow[j] = ys
            events += ys != y
    return events, gmx, gmn


def _setup(x: Any, e_row: Any, p: LayerNormParams, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` and their exponents, checked (``check``: the int64 variance bound too,
    else the caller checks it with :func:`_check_bound`)."""
    x = require_int("layernorm: x", x)
    e_row = require_int("layernorm: e_row", e_row)
    if x.ndim == 0:
        raise ValueError("layernorm: x must have at least one axis (the normalized axis is the last)")
    h = x.shape[-1]
    if p.gamma.shape != (h,):
        raise ValueError(f"layernorm: x has H={h} channels, gamma has {p.gamma.shape[0]}")
    try:
        er = np.broadcast_to(e_row, x.shape[:-1] + (1,))
    except ValueError:
        raise ValueError(f"layernorm: e_row shape {e_row.shape} does not broadcast to {x.shape[:-1] + (1,)}") from None
    if er.size and (int(er.min()) < -1100 or int(er.max()) > 1100):
        raise ValueError(f"layernorm: e_row values must be in -1100..1100, got {int(er.min())}..{int(er.max())}")
    xr = np.ascontiguousarray(x, dtype=np.int64).reshape(-1, h)
    if check and xr.size:
        _check_bound(int(xr.max()), int(xr.min()), h)
    return xr, np.ascontiguousarray(er, dtype=np.int64).reshape(-1)


def _check_bound(mx: int, mn: int, h: int) -> None:
    b = max(abs(mn), abs(mx)).bit_length()
    if 2 * b + h.bit_length() > 59:
        raise ValueError(
            f"layernorm: |x| of {b} bits with H={h} would overflow the int64 variance "
            f"(2 * bitlen(max|x|) + bitlen(H) must be <= 59); narrow the input to "
            f"{(59 - h.bit_length()) // 2} magnitude bits"
        )


def layernorm(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> tuple[np.ndarray, int]:
    """LayerNorm over the last axis (Numba).

    ``x``: int rows ``(..., H)``, value ``x * 2**e_row``; ``e_row``: int, broadcastable to
    ``(..., 1)``. Returns ``(y, p.e_out)``: ``y`` int64 codes, signed ``p.out_bits`` (SAT),
    x's shape. Steps, widths, roundings and the overflow check: module docstring.
    """
    return layernorm_counted(x, e_row, p)[0], p.e_out


def layernorm_counted(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> tuple[np.ndarray, int]:
    """:func:`layernorm`'s codes and its saturation events: each output value step 6's SAT
    changes, and each row whose variance plus eps (step 3) saturates at ``2**62 - 1``."""
    xr, er = _setup(x, e_row, p, check=False)
    lo, hi = int_range(p.out_bits, True)
    out = np.empty(xr.shape, np.int64)
    ev, mx, mn = _ln_rows(
        xr, er, p.gamma, p.beta, p.e_gamma, p.eps_m, p.eps_e, p.norm_frac_bits, p.e_out, lo, hi, p.out_bits, out
    )
    if xr.size:
        _check_bound(int(mx), int(mn), xr.shape[1])
    return out.reshape(np.shape(x)), int(ev)


def layernorm_ref(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`layernorm` (Python ints, one row at a time)."""
    return layernorm_counted_ref(x, e_row, p)[0], p.e_out


def layernorm_counted_ref(x: np.ndarray, e_row: np.ndarray, p: LayerNormParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`layernorm_counted`."""
    xr, er = _setup(x, e_row, p)
    h = xr.shape[1]
    fn = p.norm_frac_bits
    out = np.empty(xr.shape, np.int64)
    events = 0
    for r in range(xr.shape[0]):
        row = [int(v) for v in xr[r]]
        m = (59 - h.bit_length() - 2 * max(abs(v) for v in row).bit_length()) // 2
        mu = ((sum(row) << (m + 1)) + h) // (2 * h)
        d = [(v << m) - mu for v in row]
        var = sum(a * a for a in d)
        sh = 2 * (int(er[r]) - m) - p.eps_e
        if sh <= 62:  # a right shift by more than 62 leaves 0 (h * eps_m < 2**44)
            var += shift_round_ref(h * p.eps_m, sh, RND)  # exact Python int for left shifts
        events += var >= LIMIT
        var = min(var, LIMIT - 1)
        t = max(0, (61 - var.bit_length()) // 2)
        sigma = isqrt_ref((var << (2 * t)) // h)
        recip = (1 << RB) // sigma if sigma else 0
        for j in range(h):
            n = shift_round_ref(d[j] * recip, RB - fn - t, RND)
            y = shift_round_ref(n * int(p.gamma[j]), p.e_out - p.e_gamma + fn, RND) + int(p.beta[j])
            out[r, j], hit = saturate_ref(y, p.out_bits, True, 0)
            events += hit
    return out.reshape(np.shape(x)), int(events)


def layernorm_float(x: np.ndarray, e_row: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Float64 oracle: LayerNorm of ``x * 2**e_row`` over the last axis."""
    v = np.asarray(x, np.float64) * np.ldexp(1.0, np.asarray(e_row, np.int64))
    mu = v.mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(v.var(-1, keepdims=True) + eps) * gamma + beta
