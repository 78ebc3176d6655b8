"""Lookup tables addressed by the top bits of a clipped fixed-point input: the shared machinery
of the LUT methods (GELU, tanh; softmax reuses :func:`interp` for its exp table).

A :class:`LutParams` approximates ``f`` for input codes ``q`` (value ``q * 2**e_in``, signed
``in_bits`` wide) on the code range ``[q_lo, q_hi)`` with ``q_hi - q_lo = 2**(addr_bits +
frac_bits)`` and ``q_lo`` a multiple of ``2**frac_bits``. For the symmetric ranges used by
GELU and tanh, ``q_lo = -2**(addr_bits + frac_bits - 1)``, so the address is the top
``addr_bits`` of the clipped input with its sign bit inverted — a wire permutation in RTL::

    q <  q_lo:  y = below                          (a constant code)
    q >= q_hi:  y = sat((q >>RND (e_out - e_in)))   if above_identity   (f(x) = x, exactly)
                y = above                           otherwise           (a constant code)
    inside:     u = q - q_lo;  a = u >> frac_bits  (the address);  f = u & (2**frac_bits - 1)
                interp:    y = T[a] + ((T[a+1] - T[a]) * f) >>RND frac_bits
                no interp: y = T[a]
    y = sat_out(y)                                 (SAT to out_bits, signed or unsigned)

``>>RND`` rounds half up (one adder of ``2**(frac_bits-1)`` before the shift). Saturation
events: each lookup that reads a table entry or constant clipped to ``out_bits`` at lowering
(``clipped``, ``below_clipped``, ``above_clipped``), or whose value the final ``sat_out`` changes. With
interpolation ``T`` has ``2**addr_bits + 1`` entries ``T[a] = round(f(knot_a) / 2**e_out)``
at the knots ``x = (q_lo + a * 2**frac_bits) * 2**e_in`` (the last one closes the final
segment); the product ``(T[a+1] - T[a]) * f`` needs ``out_bits + 1 + frac_bits`` bits.
Without interpolation ``T`` has ``2**addr_bits`` entries, each ``f`` at its segment's centre.
Entries are rounded to nearest (ties away from zero, ``np.round`` of a float is only used at
lowering) and clipped to ``out_bits``. Tables are made once, at lowering, by :func:`make_lut`.

Error of the interpolated table, inside the range: ``h**2 / 8 * max|f''|`` (``h`` the knot
spacing in real units) plus one output step (entry rounding, interpolation rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import int_range, require_int, saturate, saturate_ref, shift_round, shift_round_ref

RND = 2  # Rounding.RND: half up
TABULATE = 4  # elements per code of the input's span from which an element-wise kernel tabulates


@dataclass(frozen=True, eq=False)
class LutParams:
    """Integer parameters of one table (all ints; ``table`` an int64 array, dumped as LUT contents).

    Attributes:
        target: the tabulated function, e.g. ``"gelu_erf"``, ``"gelu_tanh"``, ``"tanh"``.
        e_in, in_bits: input exponent and signed input width.
        e_out, out_bits, signed: output exponent, width and signedness.
        q_lo: first input code inside the table; a multiple of ``2**frac_bits``.
        addr_bits: table address width; ``frac_bits``: input bits below the address.
        interp: linear interpolation between neighbouring entries.
        table: int64 entries at ``e_out`` (``2**addr_bits + interp`` of them).
        below: code for ``q < q_lo``; ``above``: code for ``q >= q_hi`` unless
        ``above_identity`` (then ``y = x`` re-expressed at ``e_out``).
        clipped: int64 0/1 per table entry, 1 where ``f`` was beyond ``out_bits`` and the entry
        was clipped at lowering; ``below_clipped``, ``above_clipped`` the same for the
        constants. A lookup that reads a clipped entry or constant is a saturation event.
    """

    target: str
    e_in: int
    in_bits: int
    e_out: int
    out_bits: int
    signed: bool
    q_lo: int
    addr_bits: int
    frac_bits: int
    interp: bool
    table: np.ndarray
    below: int
    above: int
    above_identity: bool
    clipped: np.ndarray
    below_clipped: bool
    above_clipped: bool

    @property
    def q_hi(self) -> int:
        """First input code above the table."""
        return self.q_lo + (1 << (self.addr_bits + self.frac_bits))

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (the table as a list, so vector dumps write it as a file)."""
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}
        d["q_hi"] = self.q_hi
        return d


def make_lut(
    f: Callable[[np.ndarray], np.ndarray],
    target: str,
    e_in: int,
    in_bits: int,
    addr_bits: int,
    out_bits: int,
    e_out: int,
    range_bits: int,
    q_lo: int,
    below: float,
    above: float | None,
    interp: bool = True,
    signed: bool = True,
) -> LutParams:
    """Tabulate ``f`` (float64 -> float64) over ``[q_lo, q_lo + 2**range_bits)`` input codes.

    ``above=None`` means ``f(x) = x`` above the range. This is lowering: float math happens
    here only, and the result is integers.
    """
    if not 1 <= addr_bits <= 16:
        raise ValueError(f"lut: addr_bits={addr_bits} must be in 1..16")
    if not 2 <= in_bits <= 32 or not 2 <= out_bits <= 32:
        raise ValueError(f"lut: in_bits={in_bits} and out_bits={out_bits} must be in 2..32")
    frac_bits = range_bits - addr_bits
    if frac_bits < 0:
        raise ValueError(
            f"lut: addr_bits={addr_bits} exceeds the {range_bits} input bits the table range spans; "
            f"use addr_bits <= {range_bits}"
        )
    if q_lo % (1 << frac_bits):
        raise ValueError(f"lut: q_lo={q_lo} must be a multiple of 2**frac_bits = {1 << frac_bits}")
    n = 1 << addr_bits
    pos = np.arange(n + 1, dtype=np.float64) if interp else np.arange(n, dtype=np.float64) + 0.5
    xs = (q_lo + pos * (1 << frac_bits)) * 2.0**e_in
    lo, hi = int_range(out_bits, signed)
    exact = np.round(f(xs) / 2.0**e_out)
    table = np.clip(exact, lo, hi).astype(np.int64)

    def code(v: float) -> int:
        return int(np.clip(np.round(v / 2.0**e_out), lo, hi))

    def clips(v: float | None) -> bool:
        return v is not None and not lo <= np.round(v / 2.0**e_out) <= hi

    return LutParams(
        target=target,
        e_in=int(e_in),
        in_bits=int(in_bits),
        e_out=int(e_out),
        out_bits=int(out_bits),
        signed=bool(signed),
        q_lo=int(q_lo),
        addr_bits=int(addr_bits),
        frac_bits=int(frac_bits),
        interp=bool(interp),
        table=table,
        below=code(below),
        above=0 if above is None else code(above),
        above_identity=above is None,
        clipped=((exact < lo) | (exact > hi)).astype(np.int64),
        below_clipped=clips(below),
        above_clipped=clips(above),
    )


def symmetric_range_bits(
    e_in: int, in_bits: int, addr_bits: int, tail_err: Callable[[float], float], f2max: float
) -> int:
    """Lowering helper: the symmetric table range ``[-2**(r-1), 2**(r-1))`` codes minimizing
    the estimated max error ``tail_err(R) + (2R / 2**addr_bits)**2 / 8 * f2max`` where
    ``R = 2**(r-1) * 2**e_in`` is the real half-range. ``r`` is in ``addr_bits..in_bits``;
    ``r = in_bits`` covers the whole input domain (no outside region is ever used)."""
    best_r, best_err = in_bits, math.inf
    for r in range(min(addr_bits, in_bits), in_bits + 1):
        half = 2.0 ** (r - 1 + e_in)
        err = (tail_err(half) if r < in_bits else 0.0) + (2 * half / 2**addr_bits) ** 2 / 8 * f2max
        if err < best_err:
            best_r, best_err = r, err
    return best_r


@nb.njit(cache=True, inline="always")
def interp(table: np.ndarray, a: np.int64, f: np.int64, frac_bits: np.int64) -> np.int64:
    """``T[a] + ((T[a+1] - T[a]) * f) >>RND frac_bits`` — one multiply, one add, one shift."""
    t0 = table[a]
    return t0 + shift_round((table[a + 1] - t0) * f, frac_bits, RND)


def interp_ref(table: np.ndarray, a: int, f: int, frac_bits: int) -> int:
    """Plain-Python twin of :func:`interp`."""
    t0, t1 = int(table[a]), int(table[a + 1])
    return t0 + shift_round_ref((t1 - t0) * f, frac_bits, RND)


@nb.njit(cache=True)
def _lut_flat(
    x, table, clipped, q_lo, q_hi, frac_bits, use_interp, below, above, ident, sh_id, lo, hi, bits, out, hits
):
    """The module docstring's steps per element; returns the saturation events and, when
    ``hits`` is not empty, stores each element's event flag there."""
    mask = (np.int64(1) << frac_bits) - 1
    events = np.int64(0)
    for i in range(x.size):
        q = np.int64(x[i])
        if q < q_lo:
            y = below
            hit = clipped[-2] != 0
        elif q >= q_hi:
            y = shift_round(q, sh_id, RND) if ident else above
            hit = clipped[-1] != 0 and not ident
        else:
            u = q - q_lo
            a = u >> frac_bits
            f = u & mask
            y = interp(table, a, f, frac_bits) if use_interp else table[a]
            hit = clipped[a] != 0 or (use_interp and f != 0 and clipped[a + 1] != 0)
        out[i] = saturate(y, lo, hi, False, bits)
        hit = hit or out[i] != y
        if hit:
            events += 1
        if hits.size:
            hits[i] = hit
    return events


def code_span(x: np.ndarray) -> np.ndarray | None:
    """Every code from ``min(x)`` to ``max(x)`` (int64, ``x`` 1-D integer) when ``x`` has at
    least :data:`TABULATE` elements per code of that span, else None. An element-wise
    kernel of one narrow input code then evaluates each code once and looks every element
    up (:func:`lookup_codes`): the same values, fewer evaluations."""
    if not x.size:
        return None
    c0, c1 = int(x.min()), int(x.max())
    if (c1 - c0 + 1) * TABULATE > x.size:
        return None
    return np.arange(c0, c1 + 1, dtype=np.int64)


@nb.njit(cache=True)
def lookup_codes(x, c0, vals, hits, out):
    """``out[i] = vals[x[i] - c0]`` (``vals`` and ``hits``, 0/1 event flags, per code from
    ``c0``); returns the number of elements whose code has an event."""
    events = np.int64(0)
    any_hit = False
    for k in range(hits.size):
        any_hit |= hits[k] != 0
    if not any_hit:
        for i in range(x.size):
            out[i] = vals[np.int64(x[i]) - c0]
        return events
    for i in range(x.size):
        k = np.int64(x[i]) - c0
        out[i] = vals[k]
        events += hits[k]
    return events


def tabulated(x: np.ndarray, kernel: Any, *args: Any) -> tuple[np.ndarray, int]:
    """``kernel(x, *args, out, hits) -> events`` (an element-wise Numba kernel of one input
    code, ``x`` 1-D) on ``x``: on the codes of :func:`code_span` and then one lookup per
    element when that span is small, else directly. int64 out, same values either way."""
    out = np.empty(x.size, np.int64)
    codes = code_span(x)
    if codes is None:
        return out, int(kernel(x, *args, out, np.empty(0, np.uint8)))
    vals = np.empty(codes.size, np.int64)
    hits = np.empty(codes.size, np.uint8)
    kernel(codes, *args, vals, hits)
    return out, int(lookup_codes(x, codes[0], vals, hits, out))


def _check(x: Any, p: LutParams) -> np.ndarray:
    x = require_int(f"{p.target}: x", x)
    lo, hi = int_range(p.in_bits, True)
    if x.size and (int(x.min()) < lo or int(x.max()) > hi):
        bad = int(x.min()) if int(x.min()) < lo else int(x.max())
        raise ValueError(f"{p.target}: x={bad} is outside the signed {p.in_bits}-bit input range [{lo}, {hi}]")
    if p.above_identity and p.e_in - p.e_out > 62 - p.in_bits:
        raise ValueError(f"{p.target}: e_out={p.e_out} is too far below e_in={p.e_in} for the identity region")
    return x


def lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Evaluate the table on signed ``p.in_bits`` input codes ``x`` (Numba).

    Returns int64 codes of ``p.out_bits`` (signed or not, per ``p.signed``) at ``p.e_out``,
    of ``x``'s shape. Every intermediate fits int64; see the module docstring for the steps.
    """
    return lut_counted(x, p)[0]


def lut_counted(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """:func:`lut` and its saturation events: each lookup that reads an entry or constant
    clipped at lowering (tanh's +1.0 is ``2**(out_bits-1) - 1``), or whose value the final
    ``sat_out`` changes (an identity-region or interpolated value beyond ``out_bits``)."""
    x = _check(x, p)
    lo, hi = int_range(p.out_bits, p.signed)
    # entry flags, then the below / above constants' flags, in one array for the kernel
    flags = np.concatenate([p.clipped, [int(p.below_clipped), int(p.above_clipped)]]).astype(np.int64)
    out, events = tabulated(
        np.ascontiguousarray(x).ravel(),
        _lut_flat,
        p.table,
        flags,
        p.q_lo,
        p.q_hi,
        p.frac_bits,
        p.interp,
        p.below,
        p.above,
        p.above_identity,
        p.e_out - p.e_in,
        lo,
        hi,
        p.out_bits,
    )
    return out.reshape(x.shape), int(events)


def lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`lut` (one element at a time, Python ints)."""
    return lut_counted_ref(x, p)[0]


def lut_counted_ref(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`lut_counted`."""
    x = _check(x, p)
    out = np.empty(x.shape, np.int64)
    events = 0
    for idx in np.ndindex(*x.shape):
        q = int(x[idx])
        if q < p.q_lo:
            y, read = p.below, p.below_clipped
        elif q >= p.q_hi:
            ident = p.above_identity
            y = shift_round_ref(q, p.e_out - p.e_in, RND) if ident else p.above
            read = p.above_clipped and not ident
        else:
            u = q - p.q_lo
            a, f = u >> p.frac_bits, u & ((1 << p.frac_bits) - 1)
            y = interp_ref(p.table, a, f, p.frac_bits) if p.interp else int(p.table[a])
            read = bool(p.clipped[a]) or (p.interp and f != 0 and bool(p.clipped[a + 1]))
        out[idx], hit = saturate_ref(y, p.out_bits, p.signed, 0)
        events += hit or read
    return out, events
