"""quantize: float -> block-scaled integers. The only kernel that reads floats.

Used by lowering (weights, tables, biases) and at the model's input boundary. Contract:

* Block exponent (POW2): the smallest integer ``e`` with ``amax <= qmax * 2**e``, where
  ``amax`` is the block's max |x| and ``qmax = 2**(bits-1)-1`` (signed) or ``2**bits-1``;
  so rounding never needs to saturate. An all-zero block gets ``EXP_ZERO``; so does a block
  whose exponent would be below ``EXP_MIN`` (-960): its values flush to zero (FTZ).
* Block scale (MULT): ``mant * 2**e`` with ``mant`` in ``[2**(mant_bits-1), 2**mant_bits)``,
  the smallest such scale with ``amax <= qmax * mant * 2**e`` (mantissa rounded up).
* Code: ``q = sat(round(v))`` with ``v = (x * 2**-e) / mant`` evaluated in IEEE float64
  (for POW2 ``v`` is exact), rounded with the format's mode exactly as the table in
  :mod:`bbct.kernels.formats` says, and narrowed with the format's saturation.
  With given (static) exponents, values beyond the range saturate and are counted in
  ``meta['overflow']``.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from bbct.kernels.blocks import block_rows, blocks_shape, effective_block, rows_restore, rows_view
from bbct.kernels.formats import (
    EXP_MIN,
    EXP_ZERO,
    FormatError,
    IntFormat,
    QTensor,
    Rounding,
    ScaleKind,
    expand_blocks,
    sat_bounds,
    saturate,
    saturate_ref,
)


def _check_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"quantize: non-finite value {x[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    return x


def _pow2_exps(amax: np.ndarray, qmax: int) -> np.ndarray:
    """Smallest integer e with ``amax <= qmax * 2**e`` per element (EXP_ZERO for 0), exactly.

    ``frexp`` gives ``amax = f * 2**ex`` with f in [0.5, 1) and ``qmax = g * 2**eq``, so e is
    ``ex - eq`` or one off. The fix-ups compare ``amax * 2**-e`` with ``qmax``: a power-of-two
    scaling whose result is near ``qmax`` (a normal float), hence exact even for subnormal
    ``amax`` -- so each comparison is decided exactly.
    """
    _, ex = np.frexp(amax)
    _, eq = np.frexp(float(qmax))
    e = (ex - eq).astype(np.int64)
    nz = amax > 0
    for _ in range(3):  # at most one step is ever needed; loops make it self-evident
        up = nz & (np.ldexp(amax, -e) > qmax)
        e = e + up
        down = nz & (np.ldexp(amax, 1 - e) <= qmax)
        e = e - down
    nz = nz & (e >= EXP_MIN)  # flush to zero below the exponent floor
    return np.where(nz, e, EXP_ZERO).astype(np.int32)


def _mult_scales(amax: np.ndarray, qmax: int, mant_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest ``m * 2**e`` (m in [2**(mant_bits-1), 2**mant_bits)) with ``amax <= qmax*m*2**e``.

    The real scale ``amax / qmax`` lies in ``[2**p, 2**(p+1))``; with ``e = p - (mant_bits-1)``
    the mantissa needed is ``ceil(amax / (qmax * 2**e))`` in ``[lo, 2*lo]``. The division is
    only a first guess: the fix-ups compare ``amax`` with ``qmax * m * 2**e`` (``qmax * m <
    2**48``, exact in float64), so m is exactly the smallest that works. ``m == 2**mant_bits``
    becomes ``lo`` at ``e + 1`` (the same scale).
    """
    lo, hi = 1 << (mant_bits - 1), 1 << mant_bits
    nz = amax > 0
    safe = np.where(nz, amax, float(qmax))
    p = _pow2_exps(safe, qmax).astype(np.int64) - 1  # 2**p < amax/qmax <= 2**(p+1)
    e = p - (mant_bits - 1)
    scaled = np.ldexp(safe, -e)  # exact (see _pow2_exps): amax / 2**e, near qmax * 2**mant_bits
    m = np.clip(np.ceil(scaled / qmax), lo, hi).astype(np.int64)
    for _ in range(4):
        up = scaled > float(qmax) * m
        m = m + up
        down = (m > lo) & (scaled <= float(qmax) * (m - 1))
        m = m - down
    top = m >= hi
    m = np.where(top, m // 2, m)
    e = e + top
    nz = nz & (e >= EXP_MIN)  # flush to zero below the exponent floor
    return np.where(nz, e, EXP_ZERO).astype(np.int32), np.where(nz, m, lo).astype(np.int32)


def block_exponents(x: np.ndarray, fmt: IntFormat) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scales from each block's max |x| (the module docstring's rules), exactly.

    Returns ``(exp, mant)``: int32 arrays of ``x``'s shape with the block axis replaced by
    the number of blocks; ``mant`` is None for POW2 formats. All-zero blocks: ``EXP_ZERO``
    (and ``mant = 2**(mant_bits-1)``). Floats are allowed here: this runs at lowering and at
    the model's input boundary. NaN/inf is a ValueError.
    """
    x = _check_float(x)
    if fmt.bits + (fmt.mant_bits if fmt.scale == ScaleKind.MULT else 0) > 53:
        raise FormatError(f"quantize: {fmt.short()} is wider than float64's 53-bit significand")
    rows, moved = rows_view(np.abs(x), fmt.block_axis)
    n = rows.shape[1]
    bs = effective_block(n, fmt.block_size)
    nblk = -(-n // bs) if n else 0
    pad = nblk * bs - n
    if pad:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], pad))], axis=1)
    amax = rows.reshape(rows.shape[0], nblk, bs).max(axis=2) if n else np.zeros((rows.shape[0], 0))
    if fmt.scale == ScaleKind.MULT:
        exp, mant = _mult_scales(amax, fmt.qmax, fmt.mant_bits)
    else:
        exp, mant = _pow2_exps(amax, fmt.qmax), None
    exp = rows_restore(exp, moved, fmt.block_axis)
    mant = None if mant is None else rows_restore(mant, moved, fmt.block_axis)
    return np.ascontiguousarray(exp), None if mant is None else np.ascontiguousarray(mant)


def mse_exponents(x: np.ndarray, fmt: IntFormat, search: int) -> np.ndarray:
    """POW2 block exponents chosen for least squared error: the max-based exponent ``e`` or
    one of ``e-1 .. e-search`` (a finer step that clips the block's largest values).

    A weight-only choice made at lowering (no data involved); ties keep the larger exponent.
    """
    if fmt.scale != ScaleKind.POW2:
        raise FormatError("mse_exponents: POW2 formats only")
    x = _check_float(x)
    exp, _ = block_exponents(x, fmt)
    best = exp.copy()
    if search <= 0:
        return best
    shape = x.shape

    def err(e: np.ndarray) -> np.ndarray:
        full = np.ldexp(1.0, expand_blocks(e.astype(np.int64), shape, fmt.block_axis, fmt.block_size))
        q = np.clip(np.rint(x / full), fmt.qmin, fmt.qmax)
        se = (q * full - x) ** 2
        rows, _ = rows_view(se, fmt.block_axis)
        n = rows.shape[1]
        bs = effective_block(n, fmt.block_size)
        nblk = -(-n // bs)
        rows = np.concatenate([rows, np.zeros((rows.shape[0], nblk * bs - n))], axis=1)
        per = rows.reshape(rows.shape[0], nblk, bs).sum(axis=2)
        return rows_restore(per, tuple(np.moveaxis(np.empty(shape), fmt.block_axis % x.ndim, -1).shape), fmt.block_axis)

    best_err = err(best)
    zero = exp == EXP_ZERO
    for k in range(1, search + 1):
        cand = np.where(zero, exp, exp - k).astype(np.int32)
        e2 = err(cand)
        better = e2 < best_err
        best = np.where(better, cand, best)
        best_err = np.where(better, e2, best_err)
    return np.ascontiguousarray(best.astype(np.int32))


def exponent_window(exp: np.ndarray, exp_bits: int) -> np.ndarray:
    """Raise block exponents into the window that ``exp_bits`` bits of storage can hold:
    ``[emax - 2**exp_bits + 1, emax]``, ``emax`` the tensor's largest real exponent (stored
    once per tensor as the window's base). ``EXP_ZERO`` blocks stay. Raising an exponent never
    clips (the block's range only grows); it coarsens the step of the smallest blocks.
    """
    exp = np.asarray(exp)
    real = exp != EXP_ZERO
    if not real.any():
        return exp.astype(np.int32)
    lo = int(exp[real].max()) - (1 << exp_bits) + 1
    return np.where(real, np.maximum(exp, lo), exp).astype(np.int32)


def gptq(
    w: np.ndarray,
    fmt: IntFormat,
    hessian: np.ndarray,
    search: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    exp_bits: int | None = None,
) -> QTensor:
    """Weights ``w`` (K, N) -> QTensor in ``fmt`` (POW2, blocks along K = axis 0) by GPTQ
    error feedback: a lowering-time choice of codes, not a kernel (Frantar et al., 2022).

    Rows k (the inputs of ``x @ w``) are quantized one after another; each row's rounding
    error is spread over the rows not yet quantized through the Cholesky factor of the
    inverse of ``hessian`` = sum of x x^T over calibration inputs (K, K), so that ``x @ q``
    stays close to ``x @ w`` on data like it. ``damp`` * mean(diag) is added to the diagonal;
    inputs never active (zero diagonal) get zero weights.

    Order and exponents: natural order (rows 0..K-1) chooses a block's exponent when the
    block starts, from the weights as updated so far; ``act_order`` visits rows by
    decreasing hessian diagonal (the most active inputs first) with exponents fixed up
    front from the original weights. Either way exponents are max-based, or least squared
    error over ``search`` lower ones (as :func:`mse_exponents`); with ``exp_bits`` they are
    kept within ``2**exp_bits`` values below the original weights' largest block exponent
    (:func:`exponent_window`; a block that outgrows the window saturates). Codes are RND_CONV (the
    format's rounding) of the updated weight over ``2**e``, saturated to the format
    (``meta['overflow']`` counts the clipped codes, as :func:`quantize` does). With a
    diagonal ``hessian`` nothing is fed forward: the result equals :func:`quantize` with the
    same exponents.
    """
    if fmt.scale != ScaleKind.POW2 or fmt.block_axis % 2 != 0 or np.ndim(w) != 2:
        raise FormatError("gptq: 2-D weights with POW2 blocks along axis 0 only")
    w = _check_float(w).copy()
    k_, n_ = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k_, k_) or not np.all(np.isfinite(h)):
        raise FormatError(f"gptq: hessian must be a finite ({k_}, {k_}) matrix, got {h.shape}")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k_)] += damp * float(np.mean(np.diag(h)))
    bs = effective_block(k_, fmt.block_size)
    nblk = -(-k_ // bs) if k_ else 0
    sub = IntFormat.from_dict(fmt.to_dict() | {"block_size": 0})

    if exp_bits is not None:  # the window below the original weights' largest exponent
        top = int(block_exponents(w, fmt)[0].max()) if w.size else 0
        bottom = top - (1 << exp_bits) + 1

    def exps(x: np.ndarray, f: IntFormat) -> np.ndarray:
        e = mse_exponents(x, f, search) if search else block_exponents(x, f)[0]
        if exp_bits is None:
            return e
        return np.where(e == EXP_ZERO, e, np.clip(e, bottom, top)).astype(np.int32)

    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        exp = exps(w, fmt).astype(np.int32)
    else:
        perm = np.arange(k_)
        exp = np.full((nblk, n_), EXP_ZERO, np.int32)
    h = h[perm][:, perm]
    w = w[perm]
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: inv(h) = u.T @ u
    except np.linalg.LinAlgError:
        raise FormatError("gptq: the damped hessian is not positive definite") from None
    codes = np.zeros((k_, n_), np.int64)
    rule = Rounding(fmt.rounding)
    n_over = 0
    for c0 in range(0, k_, bs):  # chunks of the visiting order; natural order: the blocks
        c1 = min(c0 + bs, k_)
        if not act_order:
            exp[c0 // bs] = exps(w[c0:c1], sub)[0]
        err = np.zeros((c1 - c0, n_))
        for i in range(c0, c1):
            e = exp[perm[i] // bs]
            zero = e == EXP_ZERO
            scale = np.ldexp(1.0, np.where(zero, 0, e).astype(np.int64))
            v = w[i] / scale
            q = np.array([round_float_ref(float(x), rule) for x in v]) if rule != Rounding.RND_CONV else np.rint(v)
            q[zero] = 0
            qc = np.clip(q, fmt.qmin, fmt.qmax)
            n_over += int(np.count_nonzero(qc != q))
            codes[perm[i]] = qc
            d = (w[i] - qc * scale) / u[i, i]
            w[i + 1 : c1] -= np.outer(u[i, i + 1 : c1], d)
            err[i - c0] = d
        w[c1:] -= u[c0:c1, c1:].T @ err  # the chunk's errors, fed to the later rows at once
    return QTensor(np.ascontiguousarray(codes.astype(fmt.dtype)), fmt, exp, None, {"overflow": n_over})


def round_float_ref(v: float, mode: Rounding | int) -> int:
    """Round a float64 to an integer with ``mode`` (the same table as integer shifts)."""
    f = math.floor(v)
    r = v - f  # exact: v and floor(v) share the exponent range
    mode = int(mode)
    if mode == Rounding.TRN:
        return int(f)
    if mode == Rounding.TRN_ZERO:
        return int(f) + 1 if (v < 0 and r != 0) else int(f)
    if r < 0.5:
        return int(f)
    if r > 0.5:
        return int(f) + 1
    if mode == Rounding.RND:
        return int(f) + 1
    if mode == Rounding.RND_ZERO:
        return int(f) + 1 if v < 0 else int(f)
    if mode == Rounding.RND_INF:
        return int(f) if v < 0 else int(f) + 1
    return int(f) + (int(f) & 1)


@nb.njit(cache=True, inline="always")
def _round_float(v: float, mode: int) -> np.int64:
    f = np.floor(v)
    r = v - f
    q = np.int64(f)
    if mode == 0:
        return q
    if mode == 1:
        return q + 1 if (v < 0 and r != 0) else q
    if r < 0.5:
        return q
    if r > 0.5:
        return q + 1
    if mode == 2:
        return q + 1
    if mode == 3:
        return q + 1 if v < 0 else q
    if mode == 4:
        return q if v < 0 else q + 1
    return q + (q & 1)


# |v| beyond 2**62 saturates before the float -> int64 conversion could overflow.
_BIG = float(2**62)


@nb.njit(cache=True)
def _quantize_rows(x, exp, mant, bs, mode, lo, hi, wrap, bits, out):
    rows, n = x.shape
    n_over = 0
    for r in range(rows):
        for j in range(n):
            b = j // bs
            e = exp[r, b]
            v = math.ldexp(x[r, j], -e)  # exact scaling by a power of two
            if mant is not None:
                v = v / mant[r, b]
            if v >= _BIG:
                q = hi + 1
            elif v <= -_BIG:
                q = lo - 1
            else:
                q = _round_float(v, mode)
            y = saturate(q, lo, hi, wrap, bits)
            if y != q:
                n_over += 1
            out[r, j] = y
    return n_over


def _prepare(x: np.ndarray, fmt: IntFormat, exp, mant):
    x = _check_float(x)
    if exp is None:
        if mant is not None:
            raise FormatError("quantize: mant given without exp")
        exp, mant = block_exponents(x, fmt)
        flushed = exp == EXP_ZERO
        if flushed.any():  # all-zero or below EXP_MIN: codes are 0
            x = np.where(expand_blocks(flushed, x.shape, fmt.block_axis, fmt.block_size), 0.0, x)
    if (mant is None) != (fmt.scale == ScaleKind.POW2):
        raise FormatError(f"quantize: a {fmt.scale.name} format needs mant={'None' if mant is None else 'an array'}")
    bshape = blocks_shape(x.shape, fmt.block_axis, fmt.block_size)
    exp_full = np.ascontiguousarray(np.broadcast_to(np.asarray(exp, np.int32), bshape))
    mant_full = None if mant is None else np.ascontiguousarray(np.broadcast_to(np.asarray(mant, np.int32), bshape))
    return x, exp_full, mant_full


def quantize(x: np.ndarray, fmt: IntFormat, exp: np.ndarray | None = None, mant: np.ndarray | None = None) -> QTensor:
    """Float -> QTensor in ``fmt`` (Numba); the model-input / weight / calibration boundary.

    ``exp``/``mant`` None: scales from :func:`block_exponents` (dynamic; nothing saturates).
    Given (static or calibrated, broadcastable to the blocks shape): used as is, values
    beyond the range saturate with ``fmt.saturation``. Each code is ``fmt.rounding`` applied
    exactly to the float64 quotient ``x / scale`` (exact for POW2; for MULT the IEEE
    quotient ``(x * 2**-e) / mant``), then narrowed. Returns codes in ``fmt.dtype`` with
    ``meta['overflow']`` = saturated elements. NaN/inf is a ValueError.
    """
    x, exp_full, mant_full = _prepare(x, fmt, exp, mant)
    rows, moved = rows_view(x, fmt.block_axis)
    bs = effective_block(rows.shape[1], fmt.block_size)
    e_rows = block_rows(exp_full, x.shape, fmt.block_axis, fmt.block_size).astype(np.int64)
    m_rows = None if mant_full is None else block_rows(mant_full, x.shape, fmt.block_axis, fmt.block_size)
    lo, hi, wrap = sat_bounds(fmt.bits, fmt.signed, fmt.saturation)
    out = np.empty(rows.shape, np.int64)
    n_over = _quantize_rows(
        rows,
        e_rows,
        None if m_rows is None else m_rows.astype(np.float64),
        max(bs, 1),
        int(fmt.rounding),
        lo,
        hi,
        wrap,
        fmt.bits,
        out,
    )
    data = rows_restore(out, moved, fmt.block_axis).astype(fmt.dtype)
    return QTensor(np.ascontiguousarray(data), fmt, exp_full, mant_full, {"overflow": int(n_over)})


def quantize_ref(
    x: np.ndarray, fmt: IntFormat, exp: np.ndarray | None = None, mant: np.ndarray | None = None
) -> QTensor:
    """Plain-Python twin of :func:`quantize` (element by element, Python ints)."""
    x, exp_full, mant_full = _prepare(x, fmt, exp, mant)
    axis = fmt.block_axis % x.ndim
    bs = effective_block(x.shape[axis], fmt.block_size)
    out = np.empty(x.shape, np.int64)
    n_over = 0
    for idx in np.ndindex(*x.shape):
        bidx = list(idx)
        bidx[axis] = idx[axis] // bs
        bidx = tuple(bidx)
        e = int(exp_full[bidx])
        v = math.ldexp(float(x[idx]), -e)
        if mant_full is not None:
            v = v / float(mant_full[bidx])
        if v >= _BIG or v <= -_BIG:
            q = (1 << 63) if v > 0 else -(1 << 63)
        else:
            q = round_float_ref(v, fmt.rounding)
        y, over = saturate_ref(q, fmt.bits, fmt.signed, fmt.saturation)
        n_over += over
        out[idx] = y
    return QTensor(out.astype(fmt.dtype), fmt, exp_full, mant_full, {"overflow": int(n_over)})
