"""GELU in integer arithmetic: a second-order polynomial of erf (I-BERT style) and a LUT.

Polynomial method (:func:`gelu_poly`), input ``q`` (signed ``in_bits``) at exponent
``e_in`` (x = q * 2**e_in). GELU(x) = x/2 * (1 + erf(x / sqrt 2)) with::

    erf(t) ~= sign(t) * (A * (min(|t|, c) - c)**2 + 1)

I-BERT's i-GELU uses ``A = -0.2888, c = 1.769`` (max |error| of GELU 1.82e-2). bbct refits the
same form for the minimax GELU error over all x (a grid of 2e5 points on [0, 12], Nelder-Mead
on the max error): ``A = -0.2575083, c = 1.8306205`` give 1.446e-2 before quantization (a free
linear term or a free constant does not help beyond 1.34e-2). In integers (``F = 15``
fraction bits for erf, every rounding RND = half up)::

    u   = min(|q|, c_q)                        c_q = round(c * sqrt 2 / 2**e_in)
    d2  = (u - c_q)**2                         <= c_q**2
    L   = (A_q * d2) >>RND s_A  + 2**F          A_q = round(A/2 * 2**(2 e_in + F + s_A)) < 0,
                                               |A_q| * c_q**2 < 2**62 (s_A picks the most bits)
    E   = sign(q) * L                          erf(x / sqrt 2) in Q.F, |E| <= 2**F
    y   = (q * (2**F + E)) >>RND (F + 1 + e_out - e_in)
    out = sat_{out_bits}(y)                    GELU at e_out (default e_out = e_in)

``L`` is in [2**F - |A| c**2 * 2**F, 2**F] (>= 0.137 * 2**F), ``q * (2**F + E)`` needs
``in_bits + F + 2`` bits. GELU(x) <= max(x, 0) so ``e_out = e_in`` never saturates.

LUT method (:func:`gelu_lut`): :mod:`bbct.kernels.lut` on a symmetric power-of-two range chosen at
lowering (minimizing tail + interpolation error), below it 0, above it the identity
(``y = x`` re-expressed at ``e_out``, exact). Targets ``"gelu_erf"`` and ``"gelu_tanh"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import int_range, require_int, saturate, saturate_ref, shift_round, shift_round_ref
from bbct.kernels.lut import (
    LutParams,
    lut,
    lut_counted,
    lut_counted_ref,
    lut_ref,
    make_lut,
    symmetric_range_bits,
    tabulated,
)

POLY_A = -0.2575083
POLY_C = 1.8306205
IBERT_A, IBERT_C = -0.2888, 1.769  # I-BERT's i-GELU constants (b = -1.769 there), for comparison
F_ERF = 15
RND = 2  # Rounding.RND: half up
TARGETS = ("gelu_erf", "gelu_tanh")


@dataclass(frozen=True)
class GeluPolyParams:
    """Integer constants of the polynomial method (see the module docstring).

    Attributes: ``e_in, in_bits`` input exponent/width; ``e_out, out_bits`` output
    exponent/width (signed); ``c_q`` clip point in input codes; ``a_q`` (negative) and
    ``s_a`` the curvature multiplier and its right shift; ``frac`` erf fraction bits.
    """

    e_in: int
    in_bits: int
    e_out: int
    out_bits: int
    c_q: int
    a_q: int
    s_a: int
    frac: int = F_ERF

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def make_gelu_poly(
    e_in: int,
    in_bits: int = 16,
    out_bits: int = 16,
    e_out: int | None = None,
    a: float = POLY_A,
    c: float = POLY_C,
) -> GeluPolyParams:
    """Lower the polynomial GELU for inputs at exponent ``e_in`` (floats -> ints here only).

    ``a, c`` default to bbct's refit; pass ``IBERT_A, IBERT_C`` for I-BERT's constants.
    """
    if not 2 <= in_bits <= 24:
        raise ValueError(f"gelu_poly: in_bits={in_bits} must be in 2..24")
    if not 2 <= out_bits <= 32:
        raise ValueError(f"gelu_poly: out_bits={out_bits} must be in 2..32")
    e_out = e_in if e_out is None else int(e_out)
    if e_out - e_in < -(F_ERF + 1):
        raise ValueError(f"gelu_poly: e_out={e_out} must be >= e_in - {F_ERF + 1} = {e_in - F_ERF - 1}")
    if a >= 0 or c <= 0:
        raise ValueError(f"gelu_poly: a={a} must be < 0 and c={c} > 0")
    c_q = max(1, round(c * math.sqrt(2) / 2.0**e_in))
    if c_q.bit_length() > 24:
        raise ValueError(f"gelu_poly: e_in={e_in} is too fine (clip point {c_q} codes exceeds 24 bits)")
    # the most multiplier bits such that |A_q| * c_q**2 < 2**62
    a_bits = 61 - 2 * c_q.bit_length()
    scale = abs(a / 2) * 2.0 ** (2 * e_in + F_ERF)
    s_a = a_bits - 1 - math.floor(math.log2(scale))
    a_q = round(a / 2 * 2.0 ** (2 * e_in + F_ERF + s_a))
    if s_a < 0:
        raise ValueError(f"gelu_poly: e_in={e_in} is too coarse for the polynomial")
    return GeluPolyParams(e_in=int(e_in), in_bits=in_bits, e_out=e_out, out_bits=out_bits, c_q=c_q, a_q=a_q, s_a=s_a)


def _check_in(name: str, x: Any, in_bits: int) -> np.ndarray:
    x = require_int(f"{name}: x", x)
    lo, hi = int_range(in_bits, True)
    if x.size and (int(x.min()) < lo or int(x.max()) > hi):
        bad = int(x.min()) if int(x.min()) < lo else int(x.max())
        raise ValueError(f"{name}: x={bad} is outside the signed {in_bits}-bit input range [{lo}, {hi}]")
    return x


@nb.njit(cache=True)
def _gelu_poly_flat(x, c_q, a_q, s_a, frac, shift, lo, hi, bits, out, hits):
    """The module docstring's steps per element; returns the saturation events and, when
    ``hits`` is not empty, stores each element's event flag there."""
    one = np.int64(1) << frac
    events = np.int64(0)
    for i in range(x.size):
        q = np.int64(x[i])
        u = -q if q < 0 else q
        if u > c_q:
            u = c_q
        d = u - c_q
        L = shift_round(a_q * (d * d), s_a, RND) + one
        e = -L if q < 0 else (L if q > 0 else np.int64(0))
        y = shift_round(q * (one + e), shift, RND)
        out[i] = saturate(y, lo, hi, False, bits)
        if out[i] != y:
            events += 1
        if hits.size:
            hits[i] = out[i] != y
    return events


def gelu_poly(x: np.ndarray, p: GeluPolyParams) -> np.ndarray:
    """GELU (erf form) by the integer polynomial (Numba).

    ``x``: signed ``p.in_bits`` codes at ``p.e_in`` (ValueError outside). Returns int64
    codes, signed ``p.out_bits`` (SAT) at ``p.e_out``. Intermediates: ``d2`` 2*bitlen(c_q)
    bits, ``A_q * d2`` < 2**62, ``q * (2**F + E)`` in_bits + F + 2 bits; roundings RND.
    """
    return gelu_poly_counted(x, p)[0]


def gelu_poly_counted(x: np.ndarray, p: GeluPolyParams) -> tuple[np.ndarray, int]:
    """:func:`gelu_poly` and its saturation events (each output the final SAT changes; none
    when ``e_out >= e_in``, since GELU(x) <= max(x, 0))."""
    x = _check_in("gelu_poly", x, p.in_bits)
    lo, hi = int_range(p.out_bits, True)
    shift = p.frac + 1 + p.e_out - p.e_in
    xf = np.ascontiguousarray(x).ravel()
    out, ev = tabulated(xf, _gelu_poly_flat, p.c_q, p.a_q, p.s_a, p.frac, shift, lo, hi, p.out_bits)
    return out.reshape(x.shape), int(ev)


def gelu_poly_ref(x: np.ndarray, p: GeluPolyParams) -> np.ndarray:
    """Plain-Python twin of :func:`gelu_poly` (Python ints, one element at a time)."""
    return gelu_poly_counted_ref(x, p)[0]


def gelu_poly_counted_ref(x: np.ndarray, p: GeluPolyParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`gelu_poly_counted`."""
    x = _check_in("gelu_poly", x, p.in_bits)
    out = np.empty(x.shape, np.int64)
    one = 1 << p.frac
    events = 0
    for idx in np.ndindex(*x.shape):
        q = int(x[idx])
        u = min(abs(q), p.c_q)
        L = shift_round_ref(p.a_q * (u - p.c_q) ** 2, p.s_a, RND) + one
        erf_q = L if q > 0 else (-L if q < 0 else 0)
        y = shift_round_ref(q * (one + erf_q), p.frac + 1 + p.e_out - p.e_in, RND)
        out[idx], hit = saturate_ref(y, p.out_bits, True, 0)
        events += hit
    return out, events


def gelu_float(x: np.ndarray, target: str = "gelu_erf") -> np.ndarray:
    """Float64 GELU — the oracle and the LUT source. ``target``: "gelu_erf" or "gelu_tanh"."""
    x = np.asarray(x, np.float64)
    if target == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if target != "gelu_erf":
        raise ValueError(f"gelu: target={target!r}, expected one of {TARGETS}")
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _gelu_tail(r: float) -> float:
    """max |GELU(x) - (x if x > 0 else 0)| for |x| >= r: r * Phi(-r) (both forms agree here)."""
    return r * 0.5 * math.erfc(r / math.sqrt(2))


def make_gelu_lut(
    e_in: int,
    in_bits: int = 16,
    addr_bits: int = 8,
    out_bits: int = 16,
    target: str = "gelu_erf",
    e_out: int | None = None,
    interp: bool = True,
    range_bits: int | None = None,
    approximate: str | None = None,
) -> LutParams:
    """Lower the GELU table for inputs at ``e_in`` (float math here only).

    The table spans the symmetric code range ``[-2**(range_bits-1), 2**(range_bits-1))``;
    ``range_bits=None`` picks the power of two minimizing the estimated max error
    ``R * Phi(-R) + h**2/8 * 0.8`` (0.8 > max|GELU''| = 2 phi(0)), ``h`` the knot spacing.
    ``approximate`` ("none"/"tanh", the ONNX attribute) is accepted as an alias of ``target``.
    Output: signed ``out_bits`` at ``e_out`` (default ``e_in``).
    """
    if approximate is not None:
        target = {"none": "gelu_erf", "tanh": "gelu_tanh"}.get(approximate, approximate)
    if target not in TARGETS:
        raise ValueError(f"gelu_lut: target={target!r}, expected one of {TARGETS}")
    e_out = e_in if e_out is None else int(e_out)
    if range_bits is None:
        range_bits = symmetric_range_bits(e_in, in_bits, addr_bits, _gelu_tail, 0.8)
    if not addr_bits <= range_bits <= in_bits:
        raise ValueError(f"gelu_lut: range_bits={range_bits} must be in addr_bits..in_bits = {addr_bits}..{in_bits}")
    return make_lut(
        lambda v: gelu_float(v, target),
        target,
        e_in,
        in_bits,
        addr_bits,
        out_bits,
        e_out,
        range_bits,
        -(1 << (range_bits - 1)),
        below=0.0,
        above=None,
        interp=interp,
    )


def gelu_lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """GELU by table (Numba): :func:`bbct.kernels.lut.lut` — address = top ``addr_bits`` of the
    clipped input, linear interpolation (RND) if ``p.interp``; below the range 0, above it
    ``x`` itself; signed ``p.out_bits`` (SAT) at ``p.e_out``."""
    return lut(x, p)


def gelu_lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`gelu_lut`."""
    return lut_ref(x, p)


def gelu_lut_counted(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """:func:`gelu_lut` and its saturation events (:func:`bbct.kernels.lut.lut_counted`)."""
    return lut_counted(x, p)


def gelu_lut_counted_ref(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`gelu_lut_counted`."""
    return lut_counted_ref(x, p)
