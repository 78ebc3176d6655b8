"""ReLU on integer codes: ``y = max(q, 0)``; the block scales pass through unchanged.

Input: codes ``q`` of any shape in a format with signed ``bits`` (the executor keeps the
tensor's :class:`~bbct.kernels.formats.IntFormat` and its per-block exponents / multipliers).
Because every block scale is positive (``2**exp``, or ``mant * 2**exp`` with ``mant > 0``),
``relu(q * scale) == max(q, 0) * scale`` exactly: the output is in the *same* format with the
*same* exponents, bit for bit. No rounding happens; an all-zero block keeps ``EXP_ZERO``.

Range: codes must lie in the signed ``bits`` range (checked, ValueError). ``max(q, 0)`` of an
in-range code is in range in every saturation mode (0 and the positive codes are inside
SAT, SAT_SYM and WRAP alike), so the saturation count is always 0; it is returned so that
every kernel has the same ``(codes, saturation events)`` shape. Overflow: none possible.

RTL idiom: a multiplexer on the sign bit, ``y = q[b-1] ? 0 : q`` (no adder, no shifter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba as nb
import numpy as np

from bbct.kernels.formats import int_range, require_int


@dataclass(frozen=True)
class ReluParams:
    """Integer parameters of :func:`relu`.

    Attributes:
        bits: signed width of the input codes, which is also the output's (2..62).
    """

    bits: int

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict."""
        return {"bits": self.bits}


def make_relu_params(bits: int) -> ReluParams:
    """ReLU's params at lowering: the signed width of the codes it sees (2..62)."""
    if not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 62:
        raise ValueError(f"relu: bits={bits!r} must be an integer in 2..62")
    return ReluParams(bits=int(bits))


def _setup(x: Any, p: ReluParams) -> np.ndarray:
    x = require_int("relu: x", x)
    if x.size:
        lo, hi = int_range(p.bits, True)
        xmin, xmax = int(x.min()), int(x.max())
        if xmin < lo or xmax > hi:
            bad = xmin if xmin < lo else xmax
            raise ValueError(f"relu: code {bad} is outside the signed {p.bits}-bit range {lo}..{hi}")
    return np.ascontiguousarray(x, dtype=np.int64)


@nb.njit(cache=True)
def _relu_flat(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else 0


def relu(x: np.ndarray, p: ReluParams) -> tuple[np.ndarray, int]:
    """ReLU on codes (Numba): returns ``(int64 codes of x's shape, 0 saturation events)``.

    The output exponents (and multipliers) are the input's, unchanged.
    """
    xf = _setup(x, p)
    out = np.empty(xf.size, np.int64)
    _relu_flat(xf.ravel(), out)
    return out.reshape(xf.shape), 0


def relu_ref(x: np.ndarray, p: ReluParams) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`relu` (Python ints, one element at a time)."""
    xf = _setup(x, p)
    out = np.empty(xf.shape, np.int64)
    for idx in np.ndindex(*xf.shape):
        v = int(xf[idx])
        out[idx] = v if v > 0 else 0
    return out, 0
