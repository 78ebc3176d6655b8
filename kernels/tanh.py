"""tanh (the pooler's activation) by table with linear interpolation.

:mod:`bbct.kernels.lut` on a symmetric power-of-two input range chosen at lowering (the one
minimizing ``2 exp(-2R) + h**2/8 * 0.77``: the tail ``1 - tanh(R) < 2 exp(-2R)`` plus the
interpolation error, ``max|tanh''| = 4/(3 sqrt 3) < 0.77``). Below the range: -1.0, above
it: +1.0. Output: signed ``out_bits`` at exponent ``-(out_bits - 1)``, so -1.0 is exactly
``-2**(out_bits-1)`` and +1.0 saturates to ``2**(out_bits-1) - 1`` (SAT).
"""

from __future__ import annotations

import math

import numpy as np

from bbct.kernels.lut import LutParams, lut, lut_counted, lut_counted_ref, lut_ref, make_lut, symmetric_range_bits


def _tanh_tail(r: float) -> float:
    return 2.0 * math.exp(-2.0 * r)


def make_tanh_lut(
    e_in: int,
    in_bits: int = 16,
    addr_bits: int = 10,
    out_bits: int = 16,
    interp: bool = True,
    range_bits: int | None = None,
) -> LutParams:
    """Lower the tanh table for signed ``in_bits`` inputs at ``e_in`` (float math here only).

    ``range_bits=None`` picks the table range (see the module docstring); otherwise the
    table spans codes ``[-2**(range_bits-1), 2**(range_bits-1))``.
    """
    if range_bits is None:
        range_bits = symmetric_range_bits(e_in, in_bits, addr_bits, _tanh_tail, 0.77)
    if not addr_bits <= range_bits <= in_bits:
        raise ValueError(f"tanh_lut: range_bits={range_bits} must be in addr_bits..in_bits = {addr_bits}..{in_bits}")
    return make_lut(
        np.tanh,
        "tanh",
        e_in,
        in_bits,
        addr_bits,
        out_bits,
        -(out_bits - 1),
        range_bits,
        -(1 << (range_bits - 1)),
        below=-1.0,
        above=1.0,
        interp=interp,
    )


def tanh_lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """tanh by table (Numba): signed ``p.in_bits`` codes at ``p.e_in`` in, int64 codes of
    signed ``p.out_bits`` at ``p.e_out = -(out_bits-1)`` out; interpolation rounds RND."""
    return lut(x, p)


def tanh_lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`tanh_lut`."""
    return lut_ref(x, p)


def tanh_lut_counted(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """:func:`tanh_lut` and its saturation events (:func:`bbct.kernels.lut.lut_counted`):
    every lookup of +1.0, which saturates to ``2**(out_bits-1) - 1``, is one."""
    return lut_counted(x, p)


def tanh_lut_counted_ref(x: np.ndarray, p: LutParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`tanh_lut_counted`."""
    return lut_counted_ref(x, p)
