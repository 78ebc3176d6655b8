"""Softmax over the last axis with an additive mask, in integer arithmetic.

Input ``x`` (codes at exponent ``e_in``, ``in_bits`` wide) and ``mask_add`` (same
exponent: 0 to keep, a large negative code to mask). Per row:

1. ``z = sat_in(x + mask_add)``                      (SAT to in_bits)
2. ``d = z - max(z)``                                 (<= 0, in_bits + 1 bits)
3. integer exp of ``d * 2**e_in`` in Q.``F`` (F = 16), two methods:

   * poly: ``D = d << G`` with ``G = 23 + e_in`` guard bits (D is in units of 2**-23),
     ``k = floor(-D / LN2_q)`` with ``LN2_q = round(ln2 * 2**23)``, ``r = D + k * LN2_q``
     in ``(-LN2_q, 0]``; ``exp(r) ~= P(r) = (C2 * (r + C1)**2 >>RND S) + C0`` (a
     2nd-order fit of the relative error on [-ln2, 0]: 0.34917 (r + 1.371)**2 + 0.34093,
     max relative error 2.8e-3, I-BERT's constants give 3.1e-3; C2 has 12 bits so
     C2 * (r + C1)**2 < 2**60), then ``E = P >> k`` (TRN; k beyond 62 gives 0).
   * lut: :mod:`kernels.lut` table of exp on [-16, 0) with ``lut_addr_bits`` address bits
     and linear interpolation, ``E = 2**F`` at d = 0, 0 below -16.
4. ``sum = sum(E)`` in int64 (>= 2**F: the max element contributes exp(0))
5. ``R = floor(2**(F + out_bits + 16) / sum)``         one reciprocal per row
6. ``y = sat_u((E * R) >>RND (F + 16))``              unsigned out_bits at exponent -out_bits
   (probability 1.0 saturates to 2**out_bits - 1).

A fully masked row is still well defined: every element is masked alike, so the row is
uniform over its maxima. No division by zero can occur (step 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from kernels.formats import int_range, require_int, saturate_ref, shift_round, shift_round_ref
from kernels.lut import LutParams, make_lut

F = 16
EXP_UNIT = 23  # D = d << G carries 23 fraction bits
RECIP_EXTRA = 16
RND = 2
EXP_A, EXP_B, EXP_C = 0.34917, 1.371, 0.34093


@dataclass(frozen=True, eq=False)
class SoftmaxParams:
    e_in: int
    in_bits: int
    out_bits: int
    e_out: int
    method: str
    guard: int
    ln2_q: int
    c1: int
    c2: int
    c2_shift: int
    c0: int
    lut: LutParams | None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "lut"}
        if self.lut is not None:
            d["lut"] = self.lut.to_dict()
        return d


def make_softmax_params(
    e_in: int, in_bits: int = 16, out_bits: int = 8, method: str = "poly", lut_addr_bits: int = 8
) -> SoftmaxParams:
    """Integer constants (and the exp table for ``method='lut'``) for inputs at ``e_in``."""
    if method not in ("poly", "lut"):
        raise ValueError(f"softmax: method={method!r}, expected 'poly' or 'lut'")
    if not 4 <= in_bits <= 24 or not 2 <= out_bits <= 16:
        raise ValueError(f"softmax: in_bits={in_bits} (4..24), out_bits={out_bits} (2..16)")
    guard = EXP_UNIT + e_in
    if guard < 0 or in_bits + 1 + guard > 62:
        raise ValueError(f"softmax: e_in={e_in} must be in -23..{61 - EXP_UNIT - in_bits}")
    scale = 2.0**EXP_UNIT  # units of D = d << guard
    ln2_q = round(math.log(2) * scale)
    c1 = round(EXP_B * scale)
    # P = C2 * (r + c1)**2 >> S + C0 in Q.F: C2 = EXP_A * 2**(F + S) / scale**2 with 12 bits
    s = 2 * EXP_UNIT - F + 12
    c2 = round(EXP_A * 2.0 ** (F + s) / scale**2)
    c0 = round(EXP_C * 2.0**F)
    table = None
    if method == "lut":
        table = make_lut(np.exp, e_in, in_bits + 1, -16.0, 0.0, lut_addr_bits, F + 2, -F, below=0.0, above=1.0)
    return SoftmaxParams(
        e_in=e_in,
        in_bits=in_bits,
        out_bits=out_bits,
        e_out=-out_bits,
        method=method,
        guard=guard,
        ln2_q=ln2_q,
        c1=c1,
        c2=c2,
        c2_shift=s,
        c0=c0,
        lut=table,
    )


@nb.njit(cache=True, inline="always")
def _exp_poly(d, g, ln2_q, c1, c2, s, c0):
    dd = d << g
    k = (-dd) // ln2_q
    r = dd + k * ln2_q
    t = r + c1
    p = shift_round(c2 * (t * t), s, RND) + c0
    if k > 62:
        return np.int64(0)
    return p >> k


@nb.njit(cache=True, inline="always")
def _exp_lut(q, table, q_lo, q_hi, frac_bits, below, above):
    if q < q_lo:
        return below
    if q >= q_hi:
        return above
    u = q - q_lo
    k = u >> frac_bits
    t0 = table[k]
    return t0 + shift_round((table[k + 1] - t0) * (u & ((np.int64(1) << frac_bits) - 1)), frac_bits, RND)


@nb.njit(cache=True)
def _softmax_rows(
    x, m, lo_in, hi_in, use_lut, g, ln2_q, c1, c2, s, c0, table, q_lo, q_hi, frac_bits, below, above, out_bits, out
):
    rows, n = x.shape
    e = np.empty(n, np.int64)
    hi_out = (np.int64(1) << out_bits) - 1
    for r in range(rows):
        zmax = lo_in
        for j in range(n):
            z = x[r, j] + m[r, j]
            if z < lo_in:
                z = lo_in
            elif z > hi_in:
                z = hi_in
            e[j] = z
            if z > zmax:
                zmax = z
        total = np.int64(0)
        for j in range(n):
            d = e[j] - zmax
            if use_lut:
                v = _exp_lut(d, table, q_lo, q_hi, frac_bits, below, above)
            else:
                v = _exp_poly(d, g, ln2_q, c1, c2, s, c0)
            e[j] = v
            total += v
        recip = (np.int64(1) << (F + out_bits + RECIP_EXTRA)) // total
        for j in range(n):
            y = shift_round(e[j] * recip, F + RECIP_EXTRA, RND)
            out[r, j] = y if y < hi_out else hi_out


def _setup(x, mask_add, p):
    x = require_int("softmax: x", x).astype(np.int64, copy=False)
    m = require_int("softmax: mask_add", mask_add).astype(np.int64, copy=False)
    try:
        m = np.broadcast_to(m, x.shape)
    except ValueError:
        raise ValueError(f"softmax: mask shape {m.shape} does not broadcast to {x.shape}") from None
    n = x.shape[-1]
    return np.ascontiguousarray(x).reshape(-1, n), np.ascontiguousarray(m).reshape(-1, n)


def softmax(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Numba kernel; unsigned codes at exponent ``p.e_out`` (int64 array of x's shape)."""
    xr, mr = _setup(x, mask_add, p)
    lo_in, hi_in = int_range(p.in_bits, True)
    out = np.empty(xr.shape, np.int64)
    t = p.lut
    _softmax_rows(
        xr,
        mr,
        lo_in,
        hi_in,
        t is not None,
        p.guard,
        p.ln2_q,
        p.c1,
        p.c2,
        p.c2_shift,
        p.c0,
        t.table if t else np.zeros(2, np.int64),
        t.q_lo if t else 0,
        t.q_hi if t else 0,
        t.frac_bits if t else 0,
        t.below if t else 0,
        t.above if t else 0,
        p.out_bits,
        out,
    )
    return out.reshape(np.shape(x)).astype(np.uint16 if p.out_bits > 8 else np.uint8)


def softmax_ref(x: np.ndarray, mask_add: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """Plain-Python twin of :func:`softmax`."""
    xr, mr = _setup(x, mask_add, p)
    lo_in, hi_in = int_range(p.in_bits, True)
    out = np.empty(xr.shape, np.int64)
    for r in range(xr.shape[0]):
        z = [min(max(int(a) + int(b), lo_in), hi_in) for a, b in zip(xr[r], mr[r], strict=True)]
        zmax = max(z)
        es = []
        for v in z:
            d = v - zmax
            if p.lut is not None:
                t = p.lut
                if d < t.q_lo:
                    ev = t.below
                elif d >= t.q_hi:
                    ev = t.above
                else:
                    u = d - t.q_lo
                    k, f = u >> t.frac_bits, u & ((1 << t.frac_bits) - 1)
                    ev = int(t.table[k]) + shift_round_ref(
                        (int(t.table[k + 1]) - int(t.table[k])) * f, t.frac_bits, RND
                    )
            else:
                dd = d << p.guard
                k = (-dd) // p.ln2_q
                rr = dd + k * p.ln2_q
                pv = shift_round_ref(p.c2 * (rr + p.c1) ** 2, p.c2_shift, RND) + p.c0
                ev = 0 if k > 62 else pv >> k
            es.append(ev)
        recip = (1 << (F + p.out_bits + RECIP_EXTRA)) // sum(es)
        for j, ev in enumerate(es):
            out[r, j] = saturate_ref(shift_round_ref(ev * recip, F + RECIP_EXTRA, RND), p.out_bits, False, 0)[0]
    return out.reshape(np.shape(x)).astype(np.uint16 if p.out_bits > 8 else np.uint8)
