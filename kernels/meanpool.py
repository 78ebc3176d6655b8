"""Masked mean over the sequence: sentence-embedding mean pooling in integer arithmetic.

Float definition (what sentence-embedding exports compute, ``ReduceSum``/``Clip``/``Div``)::

    y[b, h] = sum_s(x[b, s, h] * mask[b, s]) / max(sum_s mask[b, s], 1e-9)

Integer contract. Input: wide int64 codes ``x`` ``(B, S, H)`` whose exponent is shared along
the sequence: ``e`` of shape ``(B, 1, H)`` (per element or per H-block), as
:func:`bbct.kernels.align.align` with ``reduce_axes=(1,)`` produces it; ``mask`` ``(B, S)``
of 0/1. Per batch row ``b``, with ``n = sum_s mask[b, s]`` (the token count) and for every
``h`` (every intermediate exact in int64)::

    A = sum over s with mask[b, s] = 1 of x[b, s, h]     exact: |A| <= S * 2**(in_bits-1)
    y = sat_out(round_r(A * 2**F / n))                    F = frac_bits; one integer division
    y = 0                      if n = 0                   (the float output is 0 there too:
                                                           the count is clamped at 1e-9, A = 0)

Rounding ``r`` of the division (``p.rounding``, default RND_CONV = half to even) is
:func:`bbct.kernels.formats.div_round`: ``A 2**F = q n + rem`` with ``0 <= rem < n``; the
quotient is a tie exactly when ``2 rem == n`` (only possible for even ``n``). Output: signed
``out_bits`` codes ``(B, H)`` narrowed with ``p.saturation`` (each narrowing that changes the
value is one event), at exponent ``e[:, 0, :] - F`` (see :func:`mean_pool_exp`).

Bounds (checked, ValueError): codes fit signed ``in_bits``, and ``in_bits + bitlen(S) + F <=
62``, so ``|A * 2**F| <= S * 2**(in_bits - 1 + F) < 2**(in_bits - 1 + bitlen(S) + F) <= 2**61``
(``S < 2**bitlen(S)``). ``|A / n| <= max|x|``, so with ``F <= out_bits - in_bits`` (the
default) only the most negative input code under SAT_SYM can saturate.

RTL idiom: an ``in_bits + bitlen(S)`` accumulator per channel with the mask bit as its
enable, a token counter, then one (sequential) divider per output with a round-to-nearest
correction from the remainder (``2 rem`` compared with ``n``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import (
    EXP_ZERO,
    Rounding,
    Saturation,
    _enum,
    div_round,
    div_round_ref,
    int_range,
    require_int,
    sat_bounds,
    saturate,
    saturate_ref,
)

LIMIT_BITS = 62


@dataclass(frozen=True)
class MeanPoolParams:
    """Integer parameters of :func:`mean_pool`.

    Attributes:
        in_bits: signed width of the input codes (2..62).
        frac_bits: F, extra fraction bits of the quotient; the output exponent is ``e - F``.
        out_bits: signed width of the output codes (2..62).
        rounding: rounding of the division (a :class:`Rounding` mode).
        saturation: narrowing to ``out_bits`` (a :class:`Saturation` mode).
    """

    in_bits: int
    frac_bits: int
    out_bits: int
    rounding: Rounding
    saturation: Saturation

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (modes by name)."""
        return {
            "in_bits": self.in_bits,
            "frac_bits": self.frac_bits,
            "out_bits": self.out_bits,
            "rounding": self.rounding.name,
            "saturation": self.saturation.name,
        }


def make_mean_pool_params(
    in_bits: int,
    out_bits: int = 16,
    frac_bits: int | None = None,
    rounding: Rounding | str = Rounding.RND_CONV,
    saturation: Saturation | str = Saturation.SAT,
) -> MeanPoolParams:
    """Mean pooling's params at lowering.

    ``frac_bits=None`` takes ``max(0, out_bits - in_bits)``: the most fraction bits with which
    a mean of ``in_bits`` codes (never larger than the largest code) still fits ``out_bits``.
    """
    for name, v in (("in_bits", in_bits), ("out_bits", out_bits)):
        if not isinstance(v, (int, np.integer)) or not 2 <= int(v) <= 62:
            raise ValueError(f"mean_pool: {name}={v!r} must be an integer in 2..62")
    if frac_bits is None:
        frac_bits = max(0, int(out_bits) - int(in_bits))
    if not isinstance(frac_bits, (int, np.integer)) or not 0 <= int(frac_bits) <= 60:
        raise ValueError(f"mean_pool: frac_bits={frac_bits!r} must be an integer in 0..60")
    if int(in_bits) + int(frac_bits) + 1 > LIMIT_BITS:
        raise ValueError(f"mean_pool: in_bits={in_bits} + frac_bits={frac_bits} + bitlen(S) must be <= 62")
    return MeanPoolParams(
        in_bits=int(in_bits),
        frac_bits=int(frac_bits),
        out_bits=int(out_bits),
        rounding=_enum(Rounding, rounding, "mean_pool: rounding"),
        saturation=_enum(Saturation, saturation, "mean_pool: saturation"),
    )


def mean_pool_exp(e: np.ndarray, p: MeanPoolParams) -> np.ndarray:
    """Output exponents of :func:`mean_pool`: ``e[:, 0, :] - F`` as int32 of shape ``(B, H)``
    (or whatever ``e``'s leading and trailing axes broadcast to); ``EXP_ZERO`` (a channel
    whose tokens are all zero blocks, so its mean is 0) stays ``EXP_ZERO``.

    ``e`` must have size 1 on the sequence axis (one exponent shared by every token).
    """
    e = require_int("mean_pool: e", e)
    if e.ndim != 3 or e.shape[1] != 1:
        raise ValueError(f"mean_pool: exponent shape {e.shape} must be (B, 1, H): one exponent shared along S")
    e2 = e[:, 0, :].astype(np.int64)
    return np.where(e2 == EXP_ZERO, EXP_ZERO, e2 - p.frac_bits).astype(np.int32)


def _setup(x: Any, mask: Any, p: MeanPoolParams) -> tuple[np.ndarray, np.ndarray]:
    x = require_int("mean_pool: x", x)
    mask = require_int("mean_pool: mask", mask)
    if x.ndim != 3:
        raise ValueError(f"mean_pool: x shape {x.shape} must be (B, S, H)")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mean_pool: mask shape {mask.shape} must be (B, S) = {x.shape[:2]}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
        raise ValueError(f"mean_pool: mask values must be 0 or 1, got {int(mask.min())}..{int(mask.max())}")
    s = x.shape[1]
    if p.in_bits + s.bit_length() + p.frac_bits > LIMIT_BITS:
        raise ValueError(
            f"mean_pool: in_bits={p.in_bits} + bitlen(S={s})={s.bit_length()} + frac_bits={p.frac_bits} "
            f"exceeds 62: the sum times 2**frac_bits could overflow int64"
        )
    if x.size:
        lo, hi = int_range(p.in_bits, True)
        xmin, xmax = int(x.min()), int(x.max())
        if xmin < lo or xmax > hi:
            bad = xmin if xmin < lo else xmax
            raise ValueError(f"mean_pool: code {bad} is outside the signed {p.in_bits}-bit range {lo}..{hi}")
    return np.ascontiguousarray(x, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)


@nb.njit(cache=True)
def _mean_pool_rows(x, mask, fb, mode, lo, hi, wrap, bits, out):
    nb_, s_, h_ = x.shape
    acc = np.empty(h_, np.int64)
    n_sat = 0
    for b in range(nb_):
        n = np.int64(0)
        for j in range(h_):
            acc[j] = 0
        for s in range(s_):
            if mask[b, s] != 0:
                n += 1
                for j in range(h_):
                    acc[j] += x[b, s, j]
        for j in range(h_):
            if n == 0:
                out[b, j] = 0
                continue
            q = div_round(acc[j] << fb, n, mode)
            y = saturate(q, lo, hi, wrap, bits)
            if y != q:
                n_sat += 1
            out[b, j] = y
    return n_sat


def mean_pool(x: np.ndarray, mask: np.ndarray, p: MeanPoolParams) -> tuple[np.ndarray, int]:
    """Masked mean over axis 1 (Numba): ``x`` int ``(B, S, H)``, ``mask`` int ``(B, S)`` of 0/1.

    Returns ``(y, saturation events)``: ``y`` int64 ``(B, H)``, signed ``p.out_bits`` codes at
    exponent ``e[:, 0, :] - p.frac_bits`` (:func:`mean_pool_exp`). Contract: module docstring.
    """
    xs, ms = _setup(x, mask, p)
    lo, hi, wrap = sat_bounds(p.out_bits, True, p.saturation)
    out = np.empty((xs.shape[0], xs.shape[2]), np.int64)
    n_sat = _mean_pool_rows(xs, ms, p.frac_bits, int(p.rounding), lo, hi, wrap, p.out_bits, out)
    return out, int(n_sat)


def mean_pool_ref(x: np.ndarray, mask: np.ndarray, p: MeanPoolParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`mean_pool` (Python ints, one output at a time)."""
    xs, ms = _setup(x, mask, p)
    bsz, s_len, h = xs.shape
    out = np.zeros((bsz, h), np.int64)
    n_sat = 0
    for b in range(bsz):
        tokens = [s for s in range(s_len) if int(ms[b, s]) == 1]
        n = len(tokens)
        if n == 0:
            continue  # torch: sum 0 / clamp(0, 1e-9) = 0
        for j in range(h):
            acc = sum(int(xs[b, s, j]) for s in tokens)
            y, over = saturate_ref(div_round_ref(acc << p.frac_bits, n, p.rounding), p.out_bits, True, p.saturation)
            out[b, j] = y
            n_sat += over
    return out, n_sat


def mean_pool_float(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float64 oracle, as exports compute it: ``sum(x * mask) / max(sum(mask), 1e-9)`` over axis 1."""
    x = np.asarray(x, np.float64)
    m = np.asarray(mask, np.float64)[:, :, None]
    return (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
