"""GELU in integer arithmetic: a second-order polynomial of erf (I-BERT style) and a LUT.

Polynomial method (``gelu_poly``), input ``q`` at exponent ``e_in`` (x = q * 2**e_in)::

    erf(t) ~= sign(t) * (A * (min(|t|, c) - c)**2 + 1),  t = x / sqrt(2)

with ``A = -0.258, c = 1.83`` (a minimax fit of the GELU error over x >= 0 on a 5e-4 grid;
I-BERT's ``-0.2888, 1.769`` gives 1.82e-2, these give 1.45e-2 before quantization).
In integers, with ``F = 15`` fraction bits for erf:

    u   = min(|q|, c_q)                 c_q = round(c * sqrt(2) / 2**e_in)   (input width)
    d2  = (u - c_q)**2                  (<= 2 * in_bits bits)
    L   = (A_q * d2) >>RND s_A  + 2**F  A_q = round(A/2 * 2**(2*e_in + F + s_A)), |A_q| < 2**20
    E   = sign(q) * L                   erf(x/sqrt 2) in Q.F, |E| <= 2**F
    y   = (q * (2**F + E)) >>RND (F + 1)     GELU = x * (1 + erf) / 2, at e_out = e_in

then saturated to ``out_bits``. Every intermediate fits int64 for in_bits <= 20.

LUT method (``gelu_lut``): :mod:`kernels.lut` on [-4, 4) (GELU(-4) = -1.3e-4, GELU(4) =
4 - 1.3e-4), below: 0, above: identity; erf or tanh form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from kernels.formats import int_range, require_int, saturate, saturate_ref, shift_round, shift_round_ref
from kernels.lut import LutParams, lut, lut_ref, make_lut

POLY_A = -0.258
POLY_C = 1.83
F_ERF = 15
RND = 2


@dataclass(frozen=True)
class GeluPolyParams:
    e_in: int
    e_out: int
    in_bits: int
    out_bits: int
    c_q: int
    a_q: int
    s_a: int
    frac: int = F_ERF

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def make_gelu_poly(e_in: int, in_bits: int = 16, out_bits: int = 16) -> GeluPolyParams:
    """Integer constants of the polynomial method for inputs at exponent ``e_in``."""
    if not 4 <= in_bits <= 20:
        raise ValueError(f"gelu_poly: in_bits={in_bits} must be in 4..20")
    c_q = round(POLY_C * math.sqrt(2) / 2.0**e_in)
    # pick s_a so that |A_q| has 20 bits: precise, and A_q * d2 < 2**(20 + 2*in_bits) < 2**62
    scale = abs(POLY_A / 2) * 2.0 ** (2 * e_in + F_ERF)
    s_a = 19 - math.floor(math.log2(scale))
    a_q = round(POLY_A / 2 * 2.0 ** (2 * e_in + F_ERF + s_a))
    return GeluPolyParams(e_in=e_in, e_out=e_in, in_bits=in_bits, out_bits=out_bits, c_q=c_q, a_q=a_q, s_a=s_a)


@nb.njit(cache=True)
def _gelu_poly_flat(x, c_q, a_q, s_a, frac, lo, hi, bits, out):
    one = np.int64(1) << frac
    for i in range(x.size):
        q = np.int64(x[i])
        u = -q if q < 0 else q
        if u > c_q:
            u = c_q
        d = u - c_q
        L = shift_round(a_q * (d * d), s_a, RND) + one
        e = -L if q < 0 else (L if q > 0 else 0)
        y = shift_round(q * (one + e), frac + 1, RND)
        out[i] = saturate(y, lo, hi, False, bits)


def gelu_poly(x: np.ndarray, p: GeluPolyParams) -> np.ndarray:
    """Numba kernel of the polynomial method; int64 codes at ``p.e_out``."""
    x = require_int("gelu_poly: x", x)
    lo, hi = int_range(p.out_bits, True)
    out = np.empty(x.size, np.int64)
    _gelu_poly_flat(np.ascontiguousarray(x).ravel(), p.c_q, p.a_q, p.s_a, p.frac, lo, hi, p.out_bits, out)
    return out.reshape(x.shape)


def gelu_poly_ref(x: np.ndarray, p: GeluPolyParams) -> np.ndarray:
    """Plain-Python twin of :func:`gelu_poly`."""
    x = require_int("gelu_poly: x", x)
    out = np.empty(x.shape, np.int64)
    one = 1 << p.frac
    for idx in np.ndindex(*x.shape):
        q = int(x[idx])
        u = min(abs(q), p.c_q)
        L = shift_round_ref(p.a_q * (u - p.c_q) ** 2, p.s_a, RND) + one
        e = (q > 0) - (q < 0)
        y = shift_round_ref(q * (one + e * L), p.frac + 1, RND)
        out[idx] = saturate_ref(y, p.out_bits, True, 0)[0]
    return out


def gelu_float(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """Float GELU (erf form, or the tanh approximation) — the oracle and the LUT source."""
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def make_gelu_lut(
    e_in: int, in_bits: int = 16, addr_bits: int = 8, out_bits: int = 16, approximate: str = "none"
) -> LutParams:
    """Table of GELU on [-4, 4) at the input exponent (e_out = e_in)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_lut: approximate={approximate!r}, expected 'none' or 'tanh'")
    return make_lut(
        lambda v: gelu_float(v, approximate), e_in, in_bits, -4.0, 4.0, addr_bits, out_bits, e_in, below=0.0, above=None
    )


def gelu_lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Numba kernel of the LUT method."""
    return lut(x, p)


def gelu_lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`gelu_lut`."""
    return lut_ref(x, p)
