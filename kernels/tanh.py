"""tanh (the pooler's activation) by table with linear interpolation.

:mod:`kernels.lut` on [-8, 8) (tanh(8) = 1 - 2.3e-7), below: -1, above: +1; output signed
``out_bits`` at exponent ``-(out_bits - 1)``, so +1.0 saturates to ``2**(out_bits-1) - 1``.
"""

from __future__ import annotations

import numpy as np

from kernels.lut import LutParams, lut, lut_ref, make_lut

RANGE = 8.0


def make_tanh_lut(e_in: int, in_bits: int = 16, addr_bits: int = 10, out_bits: int = 16) -> LutParams:
    """Table of tanh for inputs at exponent ``e_in`` (float math here only)."""
    return make_lut(np.tanh, e_in, in_bits, -RANGE, RANGE, addr_bits, out_bits, -(out_bits - 1), below=-1.0, above=1.0)


def tanh_lut(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Numba kernel: int64 codes at ``p.e_out``."""
    return lut(x, p)


def tanh_lut_ref(x: np.ndarray, p: LutParams) -> np.ndarray:
    """Plain-Python twin of :func:`tanh_lut`."""
    return lut_ref(x, p)
