"""bias_add: a constant per-channel bias added to a fixed-point tensor (ONNX ``Add`` of a
bias after a ``MatMul`` whose output the model quantizes before the bias).

A quantizer may state the codes of a MatMul's product *before* its bias (onnxruntime's
``quantize_static`` does, QDQ or QOperator): ``y = DQ(Q(x @ W)) + b``. bbct computes the
product's given codes exactly, dequantizes them to a fixed exponent ``e``
(:func:`bbct.simulator.qdq.dequantize`), and adds the bias there. Lowering brings the float
bias to the same exponent once (``round(b * 2**-e)``, half to even); this kernel sees integers
only.

Contract of :func:`bias_add`:

* ``x``: int64 codes of shape ``(..., N)`` (at least 1-D) at one exponent (the caller's); ``|x| < 2**62``.
* ``bias``: int64 codes ``(N,)`` at the same exponent, ``|bias| < 2**62``.
* ``y = sat(x + bias[n])`` to ``bits`` (2..62, signed) with ``saturation``; the sum is exact
  in int64 (``|x + b| < 2**63``); each clipped element is one saturation event.

RTL idiom: one adder per lane with a bias register per channel and a clamp; no shifter (the
bias is stored at the activation's exponent).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.formats import Saturation, require_int, sat_bounds, saturate, saturate_ref

_LIMIT = 1 << 62


def _setup(x: np.ndarray, bias: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    x = require_int("bias_add: x", x).astype(np.int64, copy=False)
    bias = require_int("bias_add: bias", bias).astype(np.int64, copy=False)
    if not 2 <= int(bits) <= 62:
        raise ValueError(f"bias_add: bits={bits} must be in 2..62")
    if x.ndim < 1 or bias.ndim != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(
            f"bias_add: bias of shape {bias.shape} for x of shape {x.shape}: need one per channel (last axis)"
        )
    for name, v in (("x", x), ("bias", bias)):
        if v.size and max(int(v.max()), -int(v.min())) >= _LIMIT:
            raise ValueError(f"bias_add: |{name}| must be < 2**62")
    return np.ascontiguousarray(x), np.ascontiguousarray(bias)


def bias_add_ref(x: np.ndarray, bias: np.ndarray, bits: int, saturation: Saturation) -> tuple[np.ndarray, int]:
    """Plain-Python reference of :func:`bias_add` (Python ints, element by element)."""
    x, bias = _setup(x, bias, bits)
    out = np.empty(x.shape, np.int64)
    events = 0
    flat, n = x.reshape(-1), max(1, bias.size)
    res = out.reshape(-1)
    for i in range(flat.size):
        y, over = saturate_ref(int(flat[i]) + int(bias[i % n]), bits, True, saturation)
        res[i] = y
        events += int(over)
    return out, events


@nb.njit(cache=True)
def _bias_add_rows(x, bias, lo, hi, wrap, bits, out):
    rows, n = x.shape
    events = 0
    for r in range(rows):
        for j in range(n):
            v = x[r, j] + bias[j]
            y = saturate(v, lo, hi, wrap, bits)
            events += y != v
            out[r, j] = y
    return events


def bias_add(x: np.ndarray, bias: np.ndarray, bits: int, saturation: Saturation) -> tuple[np.ndarray, int]:
    """``sat(x + bias[n])`` per channel ``n`` (last axis), Numba; returns (int64 codes,
    saturation events). Same contract as :func:`bias_add_ref`."""
    x, bias = _setup(x, bias, bits)
    lo, hi, wrap = sat_bounds(bits, True, saturation)
    rows = x.reshape(-1, bias.size) if bias.size else x.reshape(0, 0)
    out = np.empty(rows.shape, np.int64)
    events = _bias_add_rows(rows, bias, lo, hi, wrap, np.int64(bits), out)
    return out.reshape(x.shape), int(events)
