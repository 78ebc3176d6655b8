"""Lookup tables with linear interpolation: the shared machinery of the LUT methods.

A :class:`LutParams` approximates ``f`` on the fixed-point input range ``[q_lo, q_lo +
2**(addr_bits + frac_bits))`` (input codes). For an input code ``q``::

    below the range: y = below          (a constant code)
    above the range: y = q >>r shift_id  if above_identity (y = x, re-expressed at e_out)
                     y = above           otherwise (a constant code)
    inside:  u = q - q_lo;  i = u >> frac_bits;  f = u & (2**frac_bits - 1)
             y = T[i] + ((T[i+1] - T[i]) * f) >>RND frac_bits

``T`` has ``2**addr_bits + 1`` entries (the last one closes the final segment), each an
integer of ``out_bits`` at exponent ``e_out``; the interpolation product needs
``out_bits + frac_bits + 1`` bits. The result is saturated to ``out_bits``. Tables are
made once, at lowering, by :func:`make_lut` from a float function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from kernels.formats import int_range, require_int, saturate, saturate_ref, shift_round, shift_round_ref

RND = 2  # interpolation rounds half up: one adder of 2**(frac_bits-1)


@dataclass(frozen=True, eq=False)
class LutParams:
    e_in: int
    e_out: int
    q_lo: int
    addr_bits: int
    frac_bits: int
    table: np.ndarray  # int64, 2**addr_bits + 1 entries
    below: int
    above: int
    above_identity: bool
    out_bits: int
    signed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}

    @property
    def q_hi(self) -> int:
        return self.q_lo + (1 << (self.addr_bits + self.frac_bits))


def make_lut(
    f: Callable[[np.ndarray], np.ndarray],
    e_in: int,
    in_bits: int,
    x_lo: float,
    x_hi: float,
    addr_bits: int,
    out_bits: int,
    e_out: int,
    below: float,
    above: float | None,
    signed: bool = True,
) -> LutParams:
    """Tabulate ``f`` on ``[x_lo, x_hi)`` (widened to a power-of-two span of input codes).

    ``above=None`` means ``f(x) = x`` above the range (GELU). Float math happens here only.
    """
    q_lo = int(np.floor(x_lo / 2.0**e_in))
    span = max(1, int(np.ceil((x_hi - x_lo) / 2.0**e_in)))
    total = max(addr_bits, int(np.ceil(np.log2(span))))
    lo_in, hi_in = int_range(in_bits, True)
    q_lo = max(q_lo, lo_in)
    frac_bits = total - addr_bits
    xs = (q_lo + (np.arange((1 << addr_bits) + 1, dtype=np.float64) * (1 << frac_bits))) * 2.0**e_in
    lo, hi = int_range(out_bits, signed)
    table = np.clip(np.round(f(xs) / 2.0**e_out), lo, hi).astype(np.int64)

    def code(v: float) -> int:
        return int(np.clip(np.round(v / 2.0**e_out), lo, hi))

    return LutParams(
        e_in=e_in,
        e_out=e_out,
        q_lo=q_lo,
        addr_bits=addr_bits,
        frac_bits=frac_bits,
        table=table,
        below=code(below),
        above=0 if above is None else code(above),
        above_identity=above is None,
        out_bits=out_bits,
        signed=signed,
    )


@nb.njit(cache=True)
def _lut_flat(x, table, q_lo, q_hi, frac_bits, below, above, ident, sh_id, lo, hi, bits, out):
    mask = (np.int64(1) << frac_bits) - 1
    for i in range(x.size):
        q = np.int64(x[i])
        if q < q_lo:
            y = below
        elif q >= q_hi:
            y = shift_round(q, sh_id, RND) if ident else above
        else:
            u = q - q_lo
            k = u >> frac_bits
            t0 = table[k]
            y = t0 + shift_round((table[k + 1] - t0) * (u & mask), frac_bits, RND)
        out[i] = saturate(y, lo, hi, False, bits)


def lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Numba kernel: evaluate the table on integer codes ``x``; int64 codes at ``p.e_out``."""
    x = require_int("lut: x", x)
    lo, hi = int_range(p.out_bits, p.signed)
    out = np.empty(x.size, np.int64)
    _lut_flat(
        np.ascontiguousarray(x).ravel(),
        p.table,
        p.q_lo,
        p.q_hi,
        p.frac_bits,
        p.below,
        p.above,
        p.above_identity,
        p.e_out - p.e_in,
        lo,
        hi,
        p.out_bits,
        out,
    )
    return out.reshape(x.shape)


def lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`lut`."""
    x = require_int("lut: x", x)
    out = np.empty(x.shape, np.int64)
    t = [int(v) for v in p.table]
    for idx in np.ndindex(*x.shape):
        q = int(x[idx])
        if q < p.q_lo:
            y = p.below
        elif q >= p.q_hi:
            y = shift_round_ref(q, p.e_out - p.e_in, RND) if p.above_identity else p.above
        else:
            u = q - p.q_lo
            k, f = u >> p.frac_bits, u & ((1 << p.frac_bits) - 1)
            y = t[k] + shift_round_ref((t[k + 1] - t[k]) * f, p.frac_bits, RND)
        out[idx] = saturate_ref(y, p.out_bits, p.signed, 0)[0]
    return out
