"""affine: quantize block-scaled codes to a given affine format (ONNX ``QuantizeLinear``).

A quantizer (onnxruntime's, say) states an activation's format as a float ``scale`` and an
integer ``zero_point``: ``value = (q - zero_point) * scale`` with ``q`` in ``qmin..qmax``
(uint8 0..255, int8 -128..127, int16, uint16, int4, uint4). bbct's activations are codes
``x`` at power-of-two exponents ``e`` (one per block). Lowering turns ``1 / scale`` into an
integer multiplier and shift once (``mult * 2**-shift ~= 1 / scale``, ``mult`` of a stated
width, :func:`bbct.kernels.requantize.quantize_multiplier`); this kernel sees integers only.

Contract of :func:`affine_quantize` (per element, ``e`` broadcast to ``x``):

* ``x``: int64 codes, ``|x| < 2**31``; ``e``: int32 exponents; ``0 < mult < 2**31``;
  ``zero_point`` in ``qmin..qmax``; ``qmin <= qmax`` within the int32 range.
* ``y = (x * mult) >>r (shift - e)`` with ``rounding``: the product is exact in int64
  (``< 2**62``); a right shift beyond 62 is taken as 62; a negative shift is an exact left
  shift, and a result of 2**62 or more in magnitude is taken as ``sign * 2**62`` (it clips
  below anyway, since ``|qmin|, |qmax| < 2**31``).
* ``q = clip(y + zero_point, qmin, qmax)``; each clip is one saturation event.
* Returns ``(q - zero_point, events)``: the centered code ``c`` in ``qmin - zp .. qmax - zp``,
  so that ``value = c * scale`` and an integer matrix product of centered codes is
  exactly onnxruntime's ``MatMulInteger(q_a, q_b, zp_a, zp_b)``.

Rounding ``RND_CONV`` (half to even) is what ``QuantizeLinear`` does on ``x / scale``; the
difference to onnxruntime is the input (bbct's codes, not float32) and the multiplier's
relative error (below ``2**-(mult_bits-1)``), both stated in the README.

RTL idiom: one ``31 x 32`` multiplier, a barrel shifter with rounding, an adder for the zero
point and a clamp; the subtract of the zero point feeds the MAC array.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.formats import Rounding, require_int, shift_round, shift_round_ref

_BIG = 1 << 62


def _setup(x: np.ndarray, e: np.ndarray, mult: int, zp: int, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    x = require_int("affine_quantize: x", x).astype(np.int64, copy=False)
    e = require_int("affine_quantize: e", e)
    if not 0 < int(mult) < (1 << 31):
        raise ValueError(f"affine_quantize: mult={mult} must be in 1..2**31-1")
    if not -(1 << 31) <= qmin <= qmax < (1 << 31) or not qmin <= zp <= qmax:
        raise ValueError(f"affine_quantize: need qmin <= zero_point <= qmax in int32, got {qmin}, {zp}, {qmax}")
    if x.size and max(int(x.max()), -int(x.min())) >= 1 << 31:
        raise ValueError(f"affine_quantize: |x| must be < 2**31, got {max(int(x.max()), -int(x.min()))}")
    try:
        e = np.broadcast_to(e, x.shape)
    except ValueError:
        raise ValueError(f"affine_quantize: e shape {e.shape} does not broadcast to x {x.shape}") from None
    return x, e.astype(np.int64)


def affine_quantize_ref(
    x: np.ndarray, e: np.ndarray, mult: int, shift: int, zp: int, qmin: int, qmax: int, rounding: Rounding
) -> tuple[np.ndarray, int]:
    """Plain-Python reference of :func:`affine_quantize` (the contract, element by element)."""
    x, e = _setup(x, e, mult, zp, qmin, qmax)
    out = np.empty(x.shape, np.int64)
    events = 0
    for idx in np.ndindex(*x.shape):
        s = int(shift) - int(e[idx])
        y = shift_round_ref(int(x[idx]) * int(mult), min(s, 62), rounding)
        y = max(-_BIG, min(_BIG, y))
        q = y + zp
        if q < qmin or q > qmax:
            events += 1
            q = min(max(q, qmin), qmax)
        out[idx] = q - zp
    return out, events


@nb.njit(cache=True)
def _affine_flat(x, e, mult, shift, zp, qmin, qmax, mode, out):
    events = 0
    for i in range(x.size):
        v = x[i] * mult
        s = shift - e[i]
        if s > 62:
            s = 62
        if s >= 0:
            y = shift_round(v, s, mode)
        else:  # exact left shift, taken as +-2**62 once it reaches that (it clips anyway)
            y = v
            for _ in range(-s):
                if y >= _BIG or y <= -_BIG:
                    break
                y = y * 2
            if y > _BIG:
                y = _BIG
            elif y < -_BIG:
                y = -_BIG
        q = y + zp
        if q < qmin:
            q = qmin
            events += 1
        elif q > qmax:
            q = qmax
            events += 1
        out[i] = q - zp
    return events


def affine_quantize(
    x: np.ndarray, e: np.ndarray, mult: int, shift: int, zp: int, qmin: int, qmax: int, rounding: Rounding
) -> tuple[np.ndarray, int]:
    """Centered affine codes of block-scaled codes (the module docstring's contract);
    returns ``(int64 codes of x's shape, saturation events)``."""
    x, e = _setup(x, e, mult, zp, qmin, qmax)
    out = np.empty(x.size, np.int64)
    n = _affine_flat(
        np.ascontiguousarray(x).ravel(),
        np.ascontiguousarray(e).ravel(),
        np.int64(mult),
        np.int64(shift),
        np.int64(zp),
        np.int64(qmin),
        np.int64(qmax),
        np.int64(int(rounding)),
        out,
    )
    return out.reshape(x.shape), int(n)


# -- run-time (dynamic) quantization with a power-of-two scale -----------------------------------
# onnxruntime's DynamicQuantizeLinear takes scale = (max(x, 0) - min(x, 0)) / 255 over the whole
# tensor at run time: a float division with no integer-only equivalent. The nearest integer
# scheme: the same range, measured on the integer codes, covered by the smallest power of two
# 2**k with range <= 255 * 2**k (at most one bit coarser than the float scale).


def _dyn_setup(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = require_int("dynamic_quantize: x", x).astype(np.int64, copy=False)
    e = require_int("dynamic_quantize: e", e)
    try:
        e = np.broadcast_to(e, x.shape).astype(np.int64)
    except ValueError:
        raise ValueError(f"dynamic_quantize: e shape {e.shape} does not broadcast to x {x.shape}") from None
    if x.size and max(int(x.max()), -int(x.min())) >= 1 << 31:
        raise ValueError("dynamic_quantize: |x| must be < 2**31")
    nz = x != 0
    if nz.any() and int(e[nz].max()) - int(e[nz].min()) > 30:
        raise ValueError(
            f"dynamic_quantize: exponents of nonzero codes span {int(e[nz].max()) - int(e[nz].min())} > 30"
        )
    return x, e


def dynamic_quantize_ref(x: np.ndarray, e: np.ndarray, rounding: Rounding) -> tuple[np.ndarray, int, int]:
    """Plain-Python reference of :func:`dynamic_quantize`."""
    x, e = _dyn_setup(x, e)
    vals = [(int(v), int(ee)) for v, ee in zip(x.ravel(), e.ravel(), strict=True) if v != 0]
    if not vals:
        return np.zeros(x.shape, np.int64), 0, 0
    e0 = min(ee for _, ee in vals)
    big = [v << (ee - e0) for v, ee in vals]
    r = max(0, max(big)) - min(0, min(big))
    k = -40
    while (r << -k) > 255 if k < 0 else r > 255 << k:
        k += 1
    lo = min(0, min(big))
    zp = min(255, max(0, shift_round_ref(-lo, k, Rounding.RND_CONV)))
    out = np.empty(x.shape, np.int64)
    for idx in np.ndindex(*x.shape):
        v = int(x[idx]) << (int(e[idx]) - e0) if x[idx] != 0 else 0
        q = min(255, max(0, shift_round_ref(v, k, rounding) + zp))
        out[idx] = q - zp
    return out, e0 + k, zp


@nb.njit(cache=True)
def _dyn_flat(x, e, mode, conv, out):
    n = x.size
    e0 = 1 << 40
    for i in range(n):
        if x[i] != 0 and e[i] < e0:
            e0 = e[i]
    if e0 == 1 << 40:
        for i in range(n):
            out[i] = 0
        return 0, 0
    hi = 0
    lo = 0
    for i in range(n):
        if x[i] != 0:
            v = x[i] << (e[i] - e0)
            if v > hi:
                hi = v
            if v < lo:
                lo = v
    r = hi - lo  # < 2**62: |x| < 2**31 shifted by at most 30
    # smallest k >= -40 with r <= 255 * 2**k
    k = -40
    while True:
        if k < 0:
            fits = r <= 255 and (r << (-k)) <= 255
        else:
            fits = k >= 55 or r <= (255 << k)
        if fits:
            break
        k += 1
    zp = shift_round(-lo, k, conv) if k > 0 else ((-lo) << (-k))
    if zp > 255:
        zp = 255
    for i in range(n):
        v = x[i] << (e[i] - e0) if x[i] != 0 else 0
        q = (shift_round(v, k, mode) if k > 0 else v << (-k)) + zp
        if q < 0:
            q = 0
        elif q > 255:
            q = 255
        out[i] = q - zp
    return e0 + k, zp


def dynamic_quantize(x: np.ndarray, e: np.ndarray, rounding: Rounding) -> tuple[np.ndarray, int, int]:
    """Quantize a whole tensor to uint8 at run time with a power-of-two scale.

    Contract: ``x`` int64 codes (``|x| < 2**31``) at per-element exponents ``e`` (nonzero
    codes' exponents within 30 of each other). With ``X = x * 2**(e - e0)`` (``e0`` the least
    exponent of a nonzero code, exact integers), ``R = max(X, 0) - min(X, 0)``, ``k`` the
    least integer >= -40 with ``R <= 255 * 2**k``: ``zp = clip(-min(X, 0) >>r k, 0, 255)``
    (half to even), ``q = clip((X >>r k) + zp, 0, 255)`` with ``rounding``. Returns
    ``(q - zp, e0 + k, zp)``: centered codes at the exponent ``e0 + k``. All zero: ``(0, 0, 0)``.
    """
    x, e = _dyn_setup(x, e)
    out = np.empty(x.size, np.int64)
    k, zp = _dyn_flat(
        np.ascontiguousarray(x).ravel(),
        np.ascontiguousarray(e).ravel(),
        np.int64(int(rounding)),
        np.int64(int(Rounding.RND_CONV)),
        out,
    )
    return out.reshape(x.shape), int(k), int(zp)
