"""Softmax over the last axis with an additive mask, in integer arithmetic.

Input ``x`` (signed ``in_bits`` codes at exponent ``e_in``) and ``mask_add`` (codes at the
same exponent, broadcastable to ``x``: 0 to keep, a large negative code to mask; the
lowering uses the in_bits type minimum). Per row of ``T`` elements:

1. ``z = sat_in(x + mask_add)``            SAT to signed in_bits (the add is exact in int64)
2. ``d = z - max(z)``                       in ``[-(2**in_bits - 1), 0]``: in_bits + 1 bits
3. ``E = exp_int(d)``: exp(d * 2**e_in) in Q.F, ``F = 22`` (:func:`exp_int`), two methods:

   * ``poly`` (I-BERT's shift + polynomial): ``D = d << G`` (``G = 23 + e_in``: D counts
     units of 2**-23), ``k = floor(-D / LN2_q)`` with ``LN2_q = round(ln2 * 2**23)`` (a
     division by a constant), ``r = D + k * LN2_q`` in ``(-LN2_q, 0]``,
     ``t = (r + C1) >>RND 8`` (Q.15, 16 bits unsigned), ``P = (C2 * t*t) >>RND 30 + C0``
     (Q.22)
     (``exp(r) ~= A (r + B)**2 + C``), ``E = P >>RND k`` (k > 62 gives 0;
     rounding, not truncation, keeps the row sum unbiased).
     Constants: a refit of I-BERT's form. A probability depends only on the *ratios* of exp
     values, and the row maximum always has r = 0, so the fit pins ``P(0) = 1`` and minimizes
     the max relative error on [-ln2, 0]: ``A, B = 0.36118282, 1.34295297``, ``C = 1 - A B**2
     = 0.34859859`` (+-2.21e-3 around exp(0)'s error of 0; I-BERT's ``0.3585, 1.353, 0.344``
     span -3.10e-3..+2.46e-3 with exp(0) at +0.3e-3). ``C2 = round(A * 2**22)``,
     ``C1 = round(B * 2**23)``, ``C0 = round(C * 2**22)``.
   * ``lut`` (base-2 shift + table): ``v = ((-d) * L2E_q) >> SV`` (TRN) is ``-d * 2**e_in *
     log2(e)`` in Q.``FV`` (``FV = lut_addr_bits + 12``, ``L2E_q = round(log2(e) * 2**30)``,
     ``SV = 30 - e_in - FV``, a left shift if negative); ``k = v >> FV``; the fraction's top
     ``lut_addr_bits`` address ``T[i] = round(2**(F - i / 2**lut_addr_bits))`` (``2**a + 1``
     entries), its low 12 bits interpolate (RND): ``m = T[i] + ((T[i+1] - T[i]) * f) >>RND
     12``; ``E = m >>RND k``
     (k > 62 gives 0).

4. ``S = sum(E)``                            declared ``sum_bits``-wide accumulator (default
   32: rows up to 1023 elements); ``T * E_max < 2**sum_bits`` is checked (ValueError) so it
   never overflows. F = 22 keeps the rounding of many small exp values out of the sum
   (T/2 steps of 2**-22 at worst).
   ``S >= E(0) > 0``: the row maximum contributes exp(0), so no division by zero exists.
5. ``R = floor(2**(F + out_bits + 16) / S)``   one integer division per row (truncating)
6. ``y = min((E * R) >>RND (F + 16), 2**out_bits - 1)``   unsigned ``out_bits`` at exponent
   ``-out_bits``: probability 1.0 saturates to ``2**out_bits - 1``.

A fully masked row (every element masked alike, so every ``z`` saturates to the type
minimum) is uniform: ``1/T`` rounded. It never divides by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import int_range, require_int, shift_round, shift_round_ref
from bbct.kernels.lut import interp, interp_ref

F = 22  # fraction bits of exp values
EXP_UNIT = 23  # poly: D = d << G counts units of 2**-23
T_SHIFT = 8  # poly: t = (r + C1) >>RND 8 is Q.15
P_SHIFT = 30  # poly: (C2 * t*t) >> 30 leaves Q.F
L2E_BITS = 30  # lut: log2(e) multiplier fraction bits
LUT_INTERP_BITS = 12  # lut: interpolation bits below the table address
MAX_LUT_ADDR_BITS = 12  # lut: the table spans one octave; more address bits than interpolation bits add nothing
RECIP_EXTRA = 16
RND = 2  # Rounding.RND: half up
EXP_A, EXP_B = 0.36118282, 1.34295297
EXP_C = 1.0 - EXP_A * EXP_B**2  # P(0) = 1
IBERT_EXP = (0.3585, 1.353, 0.344)
METHODS = ("poly", "lut")
MEMO_SIZE = 1 << 17  # exp values kept per call, for d in (-MEMO_SIZE, 0]


@dataclass(frozen=True, eq=False)
class SoftmaxParams:
    """Integer parameters of :func:`softmax` (see the module docstring for each constant).

    ``exp_table`` is the LUT method's table (int64; empty for ``poly``); ``e_max`` the
    largest exp value (bounds the sum); ``max_len`` the longest row ``sum_bits`` allows.
    """

    e_in: int
    in_bits: int
    out_bits: int
    e_out: int
    method: str
    exp_frac: int
    sum_bits: int
    guard: int
    ln2_q: int
    c0: int
    c1: int
    c2: int
    l2e_q: int
    sv: int
    fv: int
    lut_addr_bits: int
    exp_table: np.ndarray
    e_max: int
    max_len: int
    recip_shift: int

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (``exp_table`` as a list: vector dumps write it as a file)."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}


def make_softmax_params(
    e_in: int,
    in_bits: int = 16,
    out_bits: int = 8,
    method: str = "poly",
    lut_addr_bits: int = 8,
    sum_bits: int = 32,
    coeffs: tuple[float, float, float] = (EXP_A, EXP_B, EXP_C),
) -> SoftmaxParams:
    """Lower softmax for inputs at exponent ``e_in`` (floats -> ints here only).

    ``coeffs`` (A, B, C) of the poly exp default to bbct's refit; ``IBERT_EXP`` for I-BERT's.
    """
    if method not in METHODS:
        raise ValueError(f"softmax: method={method!r}, expected one of {METHODS}")
    if not 2 <= in_bits <= 24:
        raise ValueError(f"softmax: in_bits={in_bits} must be in 2..24")
    if not 2 <= out_bits <= 16:
        raise ValueError(f"softmax: out_bits={out_bits} must be in 2..16")
    if not 1 <= lut_addr_bits <= MAX_LUT_ADDR_BITS:
        raise ValueError(f"softmax: lut_addr_bits={lut_addr_bits} must be in 1..{MAX_LUT_ADDR_BITS}")
    if not F + 2 <= sum_bits <= 62:
        raise ValueError(f"softmax: sum_bits={sum_bits} must be in {F + 2}..62")
    guard = EXP_UNIT + e_in
    if guard < 0 or in_bits + 1 + guard > 62:
        raise ValueError(f"softmax: e_in={e_in} must be in {-EXP_UNIT}..{61 - EXP_UNIT - in_bits}")
    a, b, c = coeffs
    ln2_q = round(math.log(2) * 2.0**EXP_UNIT)
    c1 = round(b * 2.0**EXP_UNIT)
    c2 = round(a * 2.0**F)
    c0 = round(c * 2.0**F)
    fv = lut_addr_bits + LUT_INTERP_BITS
    l2e_q = round(math.log2(math.e) * 2.0**L2E_BITS)
    sv = L2E_BITS - e_in - fv
    if in_bits + 2 + max(0, -sv) + L2E_BITS > 62:
        raise ValueError(f"softmax: e_in={e_in} is too coarse for the lut exp (v would exceed 62 bits)")
    n = 1 << lut_addr_bits
    table = np.round(2.0 ** (F - np.arange(n + 1) / n)).astype(np.int64) if method == "lut" else np.zeros(0, np.int64)
    # largest exp value: at d = 0 (poly: P(0) = C2 * (C1 >> 8)**2 >> 30 + C0; lut: T[0] = 2**F)
    t0 = shift_round_ref(c1, T_SHIFT, RND)
    e_max = shift_round_ref(c2 * t0 * t0, P_SHIFT, RND) + c0 if method == "poly" else 1 << F
    return SoftmaxParams(
        e_in=int(e_in),
        in_bits=in_bits,
        out_bits=out_bits,
        e_out=-out_bits,
        method=method,
        exp_frac=F,
        sum_bits=sum_bits,
        guard=guard,
        ln2_q=ln2_q,
        c0=c0,
        c1=c1,
        c2=c2,
        l2e_q=l2e_q,
        sv=sv,
        fv=fv,
        lut_addr_bits=lut_addr_bits,
        exp_table=table,
        e_max=int(e_max),
        max_len=((1 << sum_bits) - 1) // int(e_max),
        recip_shift=F + out_bits + RECIP_EXTRA,
    )


# ---------------------------------------------------------------------------------------
# Integer exp of d <= 0 (the Numba scalar and its reference twin).


@nb.njit(cache=True, inline="always")
def _exp_poly(d, g, ln2_q, c1, c2, c0):
    dd = d << g
    k = (-dd) // ln2_q
    r = dd + k * ln2_q
    t = shift_round(r + c1, T_SHIFT, RND)
    p = shift_round(c2 * (t * t), P_SHIFT, RND) + c0
    if k > 62:
        return np.int64(0)
    return shift_round(p, k, RND)


@nb.njit(cache=True, inline="always")
def _exp_lut(d, l2e_q, sv, fv, addr_bits, table):
    v = shift_round(-d * l2e_q, sv, 0)  # TRN (floor); a left shift when sv < 0
    k = v >> fv
    f = v & ((np.int64(1) << fv) - 1)
    ib = fv - addr_bits
    m = interp(table, f >> ib, f & ((np.int64(1) << ib) - 1), ib)
    if k > 62:
        return np.int64(0)
    return shift_round(m, k, RND)


def _exp_ref(d: int, p: SoftmaxParams) -> int:
    """One exp value, Python ints: the same steps as the Numba scalars."""
    if p.method == "poly":
        dd = d << p.guard
        k = (-dd) // p.ln2_q
        r = dd + k * p.ln2_q
        t = shift_round_ref(r + p.c1, T_SHIFT, RND)
        e = shift_round_ref(p.c2 * t * t, P_SHIFT, RND) + p.c0
    else:
        v = shift_round_ref(-d * p.l2e_q, p.sv, 0)
        k = v >> p.fv
        f = v & ((1 << p.fv) - 1)
        ib = p.fv - p.lut_addr_bits
        e = interp_ref(p.exp_table, f >> ib, f & ((1 << ib) - 1), ib)
    return 0 if k > 62 else shift_round_ref(e, k, RND)


@nb.njit(cache=True)
def _exp_flat(d, poly, g, ln2_q, c1, c2, c0, l2e_q, sv, fv, addr_bits, table, out):
    for i in range(d.size):
        v = np.int64(d[i])
        if poly:
            out[i] = _exp_poly(v, g, ln2_q, c1, c2, c0)
        else:
            out[i] = _exp_lut(v, l2e_q, sv, fv, addr_bits, table)


def _check_d(d: Any, p: SoftmaxParams) -> np.ndarray:
    d = require_int("exp_int: d", d)
    if d.size and (int(d.max()) > 0 or int(d.min()) < -(1 << p.in_bits)):
        bad = int(d.max()) if int(d.max()) > 0 else int(d.min())
        raise ValueError(f"exp_int: d={bad} must be in [-2**{p.in_bits}, 0]")
    return d


def exp_int(d: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Step 3 alone (Numba): exp(d * 2**p.e_in) for ``-2**in_bits <= d <= 0``, int64 in Q.22
    (``p.method``: "poly" or "lut"; see the module docstring for every width and rounding)."""
    d = _check_d(d, p)
    out = np.empty(d.size, np.int64)
    _exp_flat(
        np.ascontiguousarray(d).ravel(),
        *_exp_consts(p),
        out,
    )
    return out.reshape(d.shape)


def exp_int_ref(d: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Plain-Python twin of :func:`exp_int`."""
    d = _check_d(d, p)
    out = np.empty(d.shape, np.int64)
    for idx in np.ndindex(*d.shape):
        out[idx] = _exp_ref(int(d[idx]), p)
    return out


def _table(p: SoftmaxParams) -> np.ndarray:
    return p.exp_table if p.exp_table.size else np.zeros(2, np.int64)


def _exp_consts(p: SoftmaxParams) -> tuple:
    """The integer exp's constants in the order the Numba kernels take them."""
    return (p.method == "poly", p.guard, p.ln2_q, p.c1, p.c2, p.c0, p.l2e_q, p.sv, p.fv, p.lut_addr_bits, _table(p))


# ---------------------------------------------------------------------------------------
# Softmax rows.


@nb.njit(cache=True)
def _softmax_rows(
    x, mc, mrow, lo_in, hi_in, poly, g, ln2_q, c1, c2, c0, l2e_q, sv, fv, addr_bits, table, ob, memo, out
):
    """The module docstring's steps per row of ``x`` (rows, n; any int dtype); the mask row
    of row ``r`` is ``mc[mrow[r]]``. exp is a function of ``d`` alone, so it is evaluated
    once per distinct ``d``: runs of equal ``d`` (a row's masked tail) reuse it, and
    ``memo[-d]`` (-1 = not yet; int32 whenever ``e_max`` fits) keeps it across rows.
    ``>>RND`` by ``s = F + 16`` is ``(v + 2**(s-1)) >> s``, as :func:`shift_round`."""
    rows, n = x.shape
    e = np.empty(n, np.int64)
    hi_out = (np.int64(1) << ob) - 1
    s_out = F + RECIP_EXTRA
    h_out = np.int64(1) << (s_out - 1)
    events = np.int64(0)
    for r in range(rows):
        xr = x[r]
        mr = mc[mrow[r]]
        zmax = np.int64(lo_in)
        for j in range(n):
            z = np.int64(xr[j]) + np.int64(mr[j])
            events += z > hi_in  # clipping at the bottom is how a mask acts, not an event
            z = min(max(z, lo_in), hi_in)
            e[j] = z
            zmax = max(zmax, z)
        total = np.int64(0)
        last_d = np.int64(1)  # no d is positive
        v = np.int64(0)
        for j in range(n):
            d = e[j] - zmax
            if d != last_d:
                last_d = d
                v = np.int64(memo[-d]) if -d < memo.size else np.int64(-1)
                if v < 0:
                    if poly:
                        v = _exp_poly(d, g, ln2_q, c1, c2, c0)
                    else:
                        v = _exp_lut(d, l2e_q, sv, fv, addr_bits, table)
                    if -d < memo.size:
                        memo[-d] = v
            e[j] = v
            total += v
        recip = (np.int64(1) << (F + ob + RECIP_EXTRA)) // total
        orow = out[r]
        for j in range(n):
            y = (e[j] * recip + h_out) >> s_out
            events += y > hi_out
            orow[j] = min(y, hi_out)
    return events


def _checked(x: Any, mask_add: Any, p: SoftmaxParams) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``mask_add`` as integer arrays, every input check done (ValueError)."""
    x = require_int("softmax: x", x)
    m = require_int("softmax: mask_add", mask_add)
    if x.ndim == 0:
        raise ValueError("softmax: x must have at least one axis (the softmax axis is the last)")
    lo, hi = int_range(p.in_bits, True)
    if x.size and (int(x.min()) < lo or int(x.max()) > hi):
        bad = int(x.min()) if int(x.min()) < lo else int(x.max())
        raise ValueError(f"softmax: x={bad} is outside the signed {p.in_bits}-bit input range [{lo}, {hi}]")
    if m.size and (int(m.min()) < -(1 << 62) or int(m.max()) > (1 << 62)):
        raise ValueError("softmax: mask_add values must be within +-2**62")
    try:
        np.broadcast_to(m, x.shape)
    except ValueError:
        raise ValueError(f"softmax: mask_add shape {m.shape} does not broadcast to x shape {x.shape}") from None
    n = x.shape[-1]
    if n > p.max_len:
        raise ValueError(
            f"softmax: rows of {n} elements could overflow the {p.sum_bits}-bit sum (at most {p.max_len}); "
            "raise sum_bits"
        )
    return x, m


def _mask_rows(m: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The mask (broadcastable to ``shape``) as its own rows (rows_m, n), and for each row of
    the (rows, n) view of ``shape`` the index of its mask row: no copy broadcast to x."""
    n = shape[-1]
    m = m.reshape((1,) * (len(shape) - m.ndim) + m.shape)
    mc = np.ascontiguousarray(np.broadcast_to(m, m.shape[:-1] + (n,))).reshape(-1, n)
    ridx = np.arange(mc.shape[0], dtype=np.int64).reshape(m.shape[:-1])
    return mc, np.ascontiguousarray(np.broadcast_to(ridx, shape[:-1])).reshape(-1)


def _setup(x: Any, mask_add: Any, p: SoftmaxParams) -> tuple[np.ndarray, np.ndarray]:
    x, m = _checked(x, mask_add, p)
    n = x.shape[-1]
    xr = np.ascontiguousarray(x, dtype=np.int64).reshape(-1, n)
    mr = np.ascontiguousarray(np.broadcast_to(m, x.shape), dtype=np.int64).reshape(-1, n)
    return xr, mr


def _out_dtype(p: SoftmaxParams) -> type:
    return np.uint8 if p.out_bits <= 8 else np.uint16


def softmax(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Softmax over the last axis (Numba).

    ``x``: signed ``p.in_bits`` codes at ``p.e_in``; ``mask_add``: int codes at ``p.e_in``
    broadcastable to ``x``. Returns unsigned ``p.out_bits`` codes (uint8/uint16) at
    ``p.e_out = -out_bits``, x's shape. Steps, widths and roundings: module docstring.
    """
    return softmax_counted(x, mask_add, p)[0]


def softmax_counted(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> tuple[np.ndarray, int]:
    """:func:`softmax` and its saturation events: each ``z`` clipped at the top of the input
    range (a positive ``mask_add``; clipping at the bottom is the mask acting) and each
    probability clipped to ``2**out_bits - 1`` (1.0, or a value rounded up to it) is one."""
    x, m = _checked(x, mask_add, p)
    xr = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    mc, mrow = _mask_rows(m, x.shape)
    lo_in, hi_in = int_range(p.in_bits, True)
    out = np.empty(xr.shape, _out_dtype(p))
    memo = np.full(min(1 << (p.in_bits + 1), MEMO_SIZE), -1, np.int32 if p.e_max < 1 << 31 else np.int64)
    events = _softmax_rows(xr, mc, mrow, lo_in, hi_in, *_exp_consts(p), p.out_bits, memo, out)
    return out.reshape(x.shape), int(events)


def softmax_ref(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Plain-Python twin of :func:`softmax` (Python ints, one row at a time)."""
    return softmax_counted_ref(x, mask_add, p)[0]


def softmax_counted_ref(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`softmax_counted`."""
    xr, mr = _setup(x, mask_add, p)
    lo_in, hi_in = int_range(p.in_bits, True)
    hi_out = (1 << p.out_bits) - 1
    out = np.empty(xr.shape, np.int64)
    events = 0
    for r in range(xr.shape[0]):
        sums = [int(a) + int(b) for a, b in zip(xr[r], mr[r], strict=True)]
        events += sum(v > hi_in for v in sums)
        z = [min(max(v, lo_in), hi_in) for v in sums]
        zmax = max(z)
        es = [_exp_ref(v - zmax, p) for v in z]
        recip = (1 << (F + p.out_bits + RECIP_EXTRA)) // sum(es)
        for j, ev in enumerate(es):
            y = shift_round_ref(ev * recip, F + RECIP_EXTRA, RND)
            events += y > hi_out
            out[r, j] = min(y, hi_out)
    return out.reshape(np.shape(x)).astype(_out_dtype(p)), int(events)


def softmax_float(x: np.ndarray, mask_add: np.ndarray, e_in: int) -> np.ndarray:
    """Float64 oracle: softmax of ``(x + mask_add) * 2**e_in`` over the last axis (no saturation)."""
    v = (np.asarray(x, np.float64) + np.asarray(mask_add, np.float64)) * 2.0**e_in
    v = np.exp(v - v.max(-1, keepdims=True))
    return v / v.sum(-1, keepdims=True)
