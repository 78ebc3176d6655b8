"""L2 normalization of rows in integer arithmetic (``torch.nn.functional.normalize``).

Float definition, over the last axis: ``y = v / max(||v||_2, eps)``.

Input: rows ``x`` (int64, ``(..., H)``) with one exponent per row ``e_row`` (value
``x * 2**e_row``; align block-scaled data over the last axis first). Per row (``>>r`` rounds
with ``p.rounding``; every intermediate is int64, bounds below)::

    1. V = sum(x * x)                                exact: V < H * 2**(2b) <= 2**62, b = bitlen(max|x|)
       V = 0 (an all-zero row): y = 0, done
    2. t = max(0, (61 - bitlen(V)) // 2)             normalize V to 60..62 bits (a leading-zero count)
       sigma = isqrt(V << 2t)                        sigma = floor(||x|| * 2**t), 2**29 < sigma < 2**31
    3. R = floor(2**RB / sigma)  (RB = 60)           one reciprocal per row, 2**29 < R < 2**31
    4. y = sat_out((x * R) >>r (RB - t - FO))        FO = out_bits - 2: y = x / ||x|| in Q.FO

``isqrt`` is :func:`bbct.kernels.layernorm.isqrt`, the digit-by-digit (restoring, base 4)
square root, ``floor(sqrt(n))`` exactly. Output: signed ``out_bits`` codes at the fixed
exponent ``p.e_out = -(out_bits - 2)``: values in ``[-1, 1]``, 1.0 is ``2**(out_bits-2)``
(a one-hot row gives it exactly in the RND modes; TRN gives ``2**FO - 1`` for +1.0 unless
the code is a power of two) with one spare bit, so nothing saturates (``|y| <= 2**FO + 1``);
the count is returned anyway.

Scale invariance: ``x / ||x||`` does not depend on ``e_row``; the exponent only matters for
eps. A nonzero row has ``||v|| >= 2**e_row`` (its codes are integers), so the eps floor can
act only on an all-zero row (output 0, as in float: ``0 / eps = 0``) as long as
``2**e_row >= eps``, i.e. ``e_row >= p.e_min = ceil(log2(eps))`` (-39 for torch's 1e-12).
A nonzero row at a smaller exponent is a ValueError (checked), never a silent difference.

Bounds (checked, ValueError): ``2 * bitlen(max|x|) + bitlen(H) <= 62`` (e.g. 26 magnitude
bits for H = 768). ``|x_j| 2**t <= sigma``, so ``|x * R| <= 2**(RB - t) <= 2**60``.

Error bound vs float (``RND*`` modes): ``|y - 2**FO x / ||x||| < 1/2 + 2**(FO - 29)`` codes
(TRN modes: ``1 + 2**(FO - 29)``). Derivation: ``s = ||x|| 2**t``; ``sigma > s - 1`` and
``R > 2**RB / sigma - 1`` give ``R / 2**RB - 1/s`` in ``(-2**-RB, 1/(s (s-1)))``; times
``|x| 2**(FO + t) <= s 2**FO`` that is below ``2**FO max(s 2**-RB, 1/(s-1)) < 2**(FO - 29)``
(``s < 2**31``, ``s - 1 > 2**29``); the final shift adds half a code (a whole code for TRN).

RTL idiom: a squaring MAC, a leading-zero count, the shift/compare/subtract square-root
loop, one divider per row, then one multiplier and rounding shifter per element (like
LayerNorm's tail, without the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import (
    Rounding,
    _enum,
    bit_length,
    require_int,
    sat_bounds,
    saturate,
    saturate_ref,
    shift_round,
    shift_round_ref,
)
from bbct.kernels.layernorm import isqrt, isqrt_ref

RB = 60
NO_EPS = -(1 << 30)  # e_min when eps = 0: no exponent is too small


@dataclass(frozen=True)
class L2NormParams:
    """Integer parameters of :func:`l2_normalize`.

    Attributes:
        out_bits: signed width of the output codes (3..32); FO = out_bits - 2 fraction bits.
        e_out: output exponent, ``-(out_bits - 2)``.
        e_min: smallest row exponent at which eps cannot act on a nonzero row,
            ``ceil(log2(eps))`` (``NO_EPS`` when eps = 0).
        rounding: rounding of the final shift (a :class:`Rounding` mode).
    """

    out_bits: int
    e_out: int
    e_min: int
    rounding: Rounding

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (the mode by name)."""
        return {"out_bits": self.out_bits, "e_out": self.e_out, "e_min": self.e_min, "rounding": self.rounding.name}


def make_l2norm_params(
    eps: float = 1e-12, out_bits: int = 16, rounding: Rounding | str = Rounding.RND_CONV
) -> L2NormParams:
    """L2 normalization's params at lowering (float math here only): eps becomes the integer
    exponent floor ``e_min = ceil(log2(eps))``; the output exponent is ``-(out_bits - 2)``."""
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"l2_normalize: eps={eps} must be finite and >= 0")
    if not isinstance(out_bits, (int, np.integer)) or not 3 <= int(out_bits) <= 32:
        raise ValueError(f"l2_normalize: out_bits={out_bits!r} must be an integer in 3..32")
    if eps > 0:
        m, e = math.frexp(eps)  # eps = m * 2**e, 0.5 <= m < 1: ceil(log2 eps) = e, or e - 1 for m = 0.5
        e_min = e - 1 if m == 0.5 else e
    else:
        e_min = NO_EPS
    return L2NormParams(
        out_bits=int(out_bits),
        e_out=-(int(out_bits) - 2),
        e_min=int(e_min),
        rounding=_enum(Rounding, rounding, "l2_normalize: rounding"),
    )


def _setup(x: Any, e_row: Any, p: L2NormParams) -> tuple[np.ndarray, np.ndarray]:
    x = require_int("l2_normalize: x", x)
    e_row = require_int("l2_normalize: e_row", e_row)
    if x.ndim == 0:
        raise ValueError("l2_normalize: x must have at least one axis (the normalized axis is the last)")
    h = x.shape[-1]
    try:
        er = np.broadcast_to(e_row, x.shape[:-1] + (1,))
    except ValueError:
        raise ValueError(
            f"l2_normalize: e_row shape {e_row.shape} does not broadcast to {x.shape[:-1] + (1,)}"
        ) from None
    xr = np.ascontiguousarray(x, dtype=np.int64).reshape(-1, h)
    er = np.ascontiguousarray(er, dtype=np.int64).reshape(-1)
    if xr.size:
        b = max(abs(int(xr.min())), abs(int(xr.max()))).bit_length()
        if 2 * b + h.bit_length() > 62:
            raise ValueError(
                f"l2_normalize: |x| of {b} bits with H={h} would overflow the int64 sum of squares "
                f"(2 * bitlen(max|x|) + bitlen(H) must be <= 62); narrow the input to "
                f"{(62 - h.bit_length()) // 2} magnitude bits"
            )
        nonzero = np.any(xr != 0, axis=1)
        if np.any(nonzero & (er < p.e_min)):
            r = int(np.argmax(nonzero & (er < p.e_min)))
            raise ValueError(
                f"l2_normalize: row {r} is nonzero at exponent {int(er[r])} < e_min={p.e_min}: its norm "
                f"could fall below eps, which this kernel does not implement"
            )
    return xr, er


@nb.njit(cache=True)
def _l2_rows(x, fo, mode, lo, hi, wrap, bits, out):
    rows, h = x.shape
    n_sat = 0
    for r in range(rows):
        v = np.int64(0)
        for j in range(h):
            v += x[r, j] * x[r, j]
        if v == 0:
            for j in range(h):
                out[r, j] = 0
            continue
        t = max(0, (61 - bit_length(v)) // 2)
        sigma = isqrt(v << (2 * t))
        recip = (np.int64(1) << RB) // sigma
        for j in range(h):
            q = shift_round(x[r, j] * recip, RB - t - fo, mode)
            y = saturate(q, lo, hi, wrap, bits)
            if y != q:
                n_sat += 1
            out[r, j] = y
    return n_sat


def l2_normalize(x: np.ndarray, e_row: np.ndarray, p: L2NormParams) -> tuple[np.ndarray, int]:
    """L2 normalization over the last axis (Numba).

    ``x``: int rows ``(..., H)``, value ``x * 2**e_row``; ``e_row``: int, broadcastable to
    ``(..., 1)`` (used only for the eps check). Returns ``(y, saturation events)``: ``y`` int64
    codes of x's shape, signed ``p.out_bits`` at exponent ``p.e_out = -(out_bits - 2)``.
    """
    xr, _ = _setup(x, e_row, p)
    lo, hi, wrap = sat_bounds(p.out_bits, True, 0)
    out = np.empty(xr.shape, np.int64)
    n_sat = _l2_rows(xr, p.out_bits - 2, int(p.rounding), lo, hi, wrap, p.out_bits, out)
    return out.reshape(np.shape(x)), int(n_sat)


def l2_normalize_ref(x: np.ndarray, e_row: np.ndarray, p: L2NormParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`l2_normalize` (Python ints, one row at a time)."""
    xr, _ = _setup(x, e_row, p)
    fo = p.out_bits - 2
    out = np.zeros(xr.shape, np.int64)
    n_sat = 0
    for r in range(xr.shape[0]):
        row = [int(v) for v in xr[r]]
        v = sum(a * a for a in row)
        if v == 0:
            continue
        t = max(0, (61 - v.bit_length()) // 2)
        recip = (1 << RB) // isqrt_ref(v << (2 * t))
        for j, a in enumerate(row):
            y, over = saturate_ref(shift_round_ref(a * recip, RB - t - fo, p.rounding), p.out_bits, True, 0)
            out[r, j] = y
            n_sat += over
    return out.reshape(np.shape(x)), n_sat


def l2_normalize_float(x: np.ndarray, e_row: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Float64 oracle (``torch.nn.functional.normalize``): ``v / max(||v||, eps)``, ``v = x * 2**e_row``."""
    v = np.asarray(x, np.float64) * np.ldexp(1.0, np.asarray(e_row, np.int64))
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), eps)
