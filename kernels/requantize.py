"""requantize: integer -> integer narrowing, with static, dynamic (MX-style) or multiplier scales.

Value convention: ``x[i] * 2**e_in[i]`` in, ``y[i] * 2**e_out[block(i)]`` out. ``x`` is int64
with ``|x| < 2**62`` (checked); ``bits`` of the output format is 2..62.

* Static (``exp_out`` given, broadcastable to the blocks shape, POW2 formats):
  ``y = sat(x >>r (e_out - e_in))`` -- one arithmetic shift with the format's rounding ``r``
  (a left shift, exact, when ``e_out < e_in``), then the format's saturation. Right shifts
  beyond 62 are taken as 62 (the result is 0, or -1/+1 as the rounding mode gives). A left
  shift whose exact result needs more than 62 bits overflows: SAT/SAT_SYM clip by sign,
  WRAP keeps the low ``bits`` bits of the exact value.
* Dynamic (``exp_out`` None), integer only, as block-floating-point hardware does with a
  leading-zero counter. Per output block: ``amax = max |x|``,
  ``s = bitlen(amax) - (bits - 1)`` (``bits`` for unsigned formats); if
  ``amax >>r s > qmax`` (the maximum rounded up to ``2**(bits-1)``), ``s += 1`` (once is
  enough). ``s`` may be negative: a left shift, exact, that gains precision. Then
  ``e_out = e_in + s`` and ``y = sat(x >>r s)``. The rule looks at the magnitude only, so
  the one value that can still saturate is a negative extreme rounded to ``-(qmax+1)``
  under SAT_SYM (and negative inputs to an unsigned format); such events are counted.
  An all-zero block gets ``EXP_ZERO``. ``e_in`` must be constant within each output
  block (an error names the first block where it is not).
* Multiplier (:func:`requantize_mult`): ``y = sat((x * M) >>r shift)``, TFLite-style
  rescale by the constant ``M * 2**-shift`` (``|x * M| < 2**62`` is checked); shifts follow
  the static rule above.

MULT output formats are not produced here (a FormatError says so): bbct stores MULT
scales only for weights, which :func:`bbct.kernels.quantize.quantize` makes at lowering.
Saturation events are counted in ``meta['overflow']`` (``QTensor``) or returned.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from bbct.kernels.blocks import block_rows, blocks_shape, effective_block, rows_restore, rows_view
from bbct.kernels.blockshift import bitlen as _bitlen
from bbct.kernels.blockshift import rshift_consts as _rshift_consts
from bbct.kernels.formats import (
    EXP_ZERO,
    FormatError,
    IntFormat,
    QTensor,
    Rounding,
    Saturation,
    ScaleKind,
    bit_length,
    extent,
    require_int,
    sat_bounds,
    saturate,
    saturate_ref,
    shift_round,
    shift_round_ref,
)

_LIMIT = 1 << 62


@nb.njit(cache=True, inline="always")
def _shift_narrow(v, s, mode, lo, hi, wrap, bits):
    """``sat(v >>r s)`` for any shift; returns (value, overflowed). Right shifts beyond 62
    are taken as 62. A left shift whose exact result needs more than 62 bits overflows:
    SAT/SAT_SYM clip by its sign, WRAP keeps the low ``bits`` bits of the exact value
    (int64 shifts are exact modulo 2**64, and ``bits`` <= 62)."""
    if s > 62:
        s = 62
    if s < 0 and v != 0 and bit_length(v) - s > 62:
        if not wrap:
            return (hi if v > 0 else lo), True
        if s <= -64:
            t = np.int64(0)
        else:
            t = v << (-s)
        m = np.int64(1) << bits
        return ((t - lo) & (m - 1)) + lo, True
    q = shift_round(v, s, mode)
    y = saturate(q, lo, hi, wrap, bits)
    return y, y != q


@nb.njit(cache=True)
def _static_rows(x, e_in, e_out, bs, mode, lo, hi, wrap, bits, out):
    rows, n = x.shape
    n_over = 0
    for r in range(rows):
        for j in range(n):
            s = np.int64(e_out[r, j // bs]) - np.int64(e_in[r, j])
            y, over = _shift_narrow(x[r, j], s, mode, lo, hi, wrap, bits)
            if over:
                n_over += 1
            out[r, j] = y
    return n_over


@nb.njit(cache=True)
def _dynamic_rows(x, e_in, bs, mode, lo, hi, wrap, bits, signed, out, e_out):
    """Returns the overflow count, or ``-1 - (r * nblk + b)`` for the first row r (and its
    block b) whose input exponents differ inside an output block."""
    rows, n = x.shape
    nblk = e_out.shape[1]
    bad = np.full(rows, -1, np.int64)
    n_over = 0
    for r in range(rows):
        for b in range(nblk):
            j0 = b * bs
            j1 = min(n, j0 + bs)
            pmax = np.int64(0)
            nmin = np.int64(0)
            e0 = e_in[r, j0]
            for j in range(j0, j1):
                if e_in[r, j] != e0 and bad[r] < 0:
                    bad[r] = b
                v = x[r, j]
                if v > pmax:
                    pmax = v
                if v < nmin:
                    nmin = v
            if pmax == 0 and nmin == 0:
                e_out[r, b] = EXP_ZERO
                for j in range(j0, j1):
                    out[r, j] = 0
                continue
            amax = pmax if pmax > -nmin else -nmin
            s = bit_length(amax) - (bits - 1 if signed else bits)
            if shift_round(amax, s, mode) > hi:
                s += 1
            e_out[r, b] = e0 + s
            for j in range(j0, j1):
                q = shift_round(x[r, j], s, mode)
                y = saturate(q, lo, hi, wrap, bits)
                if y != q:
                    n_over += 1
                out[r, j] = y
    for r in range(rows):
        if bad[r] >= 0:
            return -1 - r * nblk - bad[r]
    return n_over


@nb.njit(cache=True, inline="always")
def _narrow_block(x, s, amax, mode, lo, hi, wrap, bits, out):
    """``out = sat(x >>r s)`` for one block (1-D views; zero-based loops over views keep the
    loads and stores contiguous) with one shift ``s`` (right shifts beyond 62 taken as 62),
    ``amax`` the block's max |x|; returns the overflow count. Same values as
    :func:`_shift_narrow`: a left shift with ``bitlen(amax) - s <= 62`` is exact for every
    element, so that loop has no branch; a longer one goes element by element."""
    n_over = 0
    if s <= 0:
        if _bitlen(amax) - s > 62:
            for j in range(x.size):
                y, over = _shift_narrow(np.int64(x[j]), s, mode, lo, hi, wrap, bits)
                n_over += over
                out[j] = y
            return n_over
        for j in range(x.size):
            q = np.int64(x[j]) << (-s)
            y = saturate(q, lo, hi, wrap, bits)
            n_over += y != q
            out[j] = y
        return n_over
    if s > 62:
        s = 62
    c, t, u, odd = _rshift_consts(s, mode)
    for j in range(x.size):
        v = np.int64(x[j])
        sg = v >> 63
        q = (v + c + (sg & t) + (sg & 1) * u + ((v >> s) & odd)) >> s
        y = saturate(q, lo, hi, wrap, bits)
        n_over += y != q
        out[j] = y
    return n_over


@nb.njit(cache=True)
def _static_blocks(x, e_blk, e_out, bs, mode, lo, hi, wrap, bits, out):
    """Static narrowing when the input exponent is one per output block (``e_blk``).
    Returns (overflow count, max, min) with max/min over ``x`` and 0, for the caller's
    range check."""
    rows, n = x.shape
    n_over = 0
    gmx = np.int64(0)
    gmn = np.int64(0)
    for r in range(rows):
        for b in range(e_out.shape[1]):
            j0 = b * bs
            j1 = min(n, j0 + bs)
            xb = x[r, j0:j1]
            mx, mn = extent(xb)
            gmx = max(gmx, mx)
            gmn = min(gmn, mn)
            s = np.int64(e_out[r, b]) - np.int64(e_blk[r, b])
            n_over += _narrow_block(xb, s, max(mx, -mn), mode, lo, hi, wrap, bits, out[r, j0:j1])
    return n_over, gmx, gmn


@nb.njit(cache=True)
def _dynamic_blocks(x, e_blk, bs, mode, lo, hi, wrap, bits, signed, out, e_out):
    """:func:`_dynamic_rows` when the input exponent is one per output block (``e_blk``), so
    there is nothing to check, in two vectorizable passes per block. Returns what
    :func:`_static_blocks` returns."""
    rows, n = x.shape
    n_over = 0
    gmx = np.int64(0)
    gmn = np.int64(0)
    for r in range(rows):
        for b in range(e_out.shape[1]):
            j0 = b * bs
            j1 = min(n, j0 + bs)
            xb = x[r, j0:j1]
            ob = out[r, j0:j1]
            mx, mn = extent(xb)
            gmx = max(gmx, mx)
            gmn = min(gmn, mn)
            if mx == 0 and mn == 0:
                e_out[r, b] = EXP_ZERO
                ob[:] = 0
                continue
            amax = max(mx, -mn)
            s = _bitlen(amax) - (bits - 1 if signed else bits)
            if shift_round(amax, s, mode) > hi:
                s += 1
            e_out[r, b] = e_blk[r, b] + s
            n_over += _narrow_block(xb, s, amax, mode, lo, hi, wrap, bits, ob)
    return n_over, gmx, gmn


def _per_row(e_in: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """The input exponents as one per row ``(rows,)`` of the (rows, n) view along the last
    axis, when ``e_in`` has size 1 on it (the usual case after a matmul); else None."""
    e = np.asarray(e_in)
    if not shape or axis % len(shape) != len(shape) - 1 or e.ndim != len(shape) or e.shape[-1] != 1:
        return None
    try:
        e = np.broadcast_to(e, shape[:-1] + (1,))
    except ValueError:
        return None
    return np.ascontiguousarray(e).reshape(-1).astype(np.int64)


def _top(x: np.ndarray) -> int:
    """max |x| (0 for an empty array), in Python ints."""
    return max(int(x.max()), -int(x.min())) if x.size else 0


def _check_top(top: int) -> None:
    if top >= _LIMIT:
        raise ValueError(f"requantize: |x| must be < 2**62, got {top}")


def requantize_blocks(
    rows: np.ndarray, e_blk: np.ndarray, fmt: IntFormat, exp_out: np.ndarray | None, shape: tuple[int, ...]
) -> QTensor:
    """:func:`requantize` of ``rows`` (int (rows, n): ``x`` of ``shape`` with its last axis,
    the block axis, as rows; ``|x| < 2**62``, checked) whose input exponent is one per
    output block, ``e_blk`` (rows, nblocks). Bit-identical to :func:`requantize` of the same
    values. Any integer dtype is read as is (no int64 copy)."""
    if fmt.scale != ScaleKind.POW2:
        raise FormatError("requantize produces POW2 formats; use requantize_mult for a multiplier rescale")
    rows = require_int("requantize: x", rows)
    if rows.dtype == np.uint64:
        rows = rows.astype(np.int64)
    n = rows.shape[1]
    bs = max(effective_block(n, fmt.block_size), 1)
    nblk = -(-n // bs) if n else 0
    lo, hi, wrap = sat_bounds(fmt.bits, fmt.signed, fmt.saturation)
    bshape = blocks_shape(shape, -1, fmt.block_size)
    try:
        e_blk = np.broadcast_to(require_int("requantize: e_blk", e_blk), (rows.shape[0], nblk))
        eo = None
        if exp_out is not None:
            eo = block_rows(require_int("requantize: exp_out", exp_out), shape, -1, fmt.block_size)
    except (ValueError, TypeError):  # the kernels check the range as they go; it is reported first
        _check_top(_top(rows))
        raise
    out = np.empty(rows.shape, fmt.dtype)
    mode = int(fmt.rounding)
    if eo is not None:
        n_over, mx, mn = _static_blocks(rows, e_blk, eo, bs, mode, lo, hi, wrap, fmt.bits, out)
        _check_top(max(int(mx), -int(mn)))
        exp = np.ascontiguousarray(np.broadcast_to(np.asarray(exp_out, np.int32), bshape))
    else:
        eo = np.empty((rows.shape[0], nblk), np.int64)
        n_over, mx, mn = _dynamic_blocks(rows, e_blk, bs, mode, lo, hi, wrap, fmt.bits, fmt.signed, out, eo)
        _check_top(max(int(mx), -int(mn)))
        exp = eo.astype(np.int32).reshape(bshape)
    return QTensor(out.reshape(shape), fmt, exp, None, {"overflow": int(n_over)})


def _setup(x, e_in, fmt):
    x = require_int("requantize: x", x).astype(np.int64, copy=False)
    e_in = require_int("requantize: e_in", e_in)
    if fmt.scale != ScaleKind.POW2:
        raise FormatError("requantize produces POW2 formats; use requantize_mult for a multiplier rescale")
    _check_top(_top(x))
    try:
        e_full = np.broadcast_to(e_in, x.shape)
    except ValueError:
        raise FormatError(f"requantize: e_in shape {e_in.shape} does not broadcast to x {x.shape}") from None
    return x, e_full


def requantize(x: np.ndarray, e_in: np.ndarray, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Narrow int ``x`` (value ``x * 2**e_in``, ``e_in`` broadcastable to ``x``) to the POW2
    format ``fmt``: static when ``exp_out`` is given, dynamic (per output block) when None.

    Rounding ``fmt.rounding`` at the one right shift, saturation ``fmt.saturation`` at the
    narrowing (see the module docstring). Returns a QTensor with ``fmt.dtype`` codes, int32
    exponents of the blocks shape and ``meta['overflow']`` = saturated elements.
    """
    xa = require_int("requantize: x", x)
    e_row = _per_row(require_int("requantize: e_in", e_in), xa.shape, fmt.block_axis)
    if e_row is not None:
        rows = np.ascontiguousarray(xa).reshape(-1, xa.shape[-1])
        return requantize_blocks(rows, e_row[:, None], fmt, exp_out, xa.shape)
    x, e_full = _setup(xa, e_in, fmt)
    axis = fmt.block_axis
    rows, moved = rows_view(x, axis)
    e_rows = rows_view(e_full, axis)[0]
    bs = effective_block(rows.shape[1], fmt.block_size)
    lo, hi, wrap = sat_bounds(fmt.bits, fmt.signed, fmt.saturation)
    out = np.empty(rows.shape, fmt.dtype)  # codes fit fmt.dtype after saturation
    bshape = blocks_shape(x.shape, axis, fmt.block_size)
    if exp_out is not None:
        eo = block_rows(require_int("requantize: exp_out", exp_out), x.shape, axis, fmt.block_size)
        n_over = _static_rows(
            rows, e_rows, eo.astype(np.int64), max(bs, 1), int(fmt.rounding), lo, hi, wrap, fmt.bits, out
        )
        exp = np.ascontiguousarray(np.broadcast_to(np.asarray(exp_out, np.int32), bshape))
    else:
        nblk = -(-rows.shape[1] // bs) if rows.shape[1] else 0
        eo = np.empty((rows.shape[0], nblk), np.int64)
        n_over = _dynamic_rows(rows, e_rows, max(bs, 1), int(fmt.rounding), lo, hi, wrap, fmt.bits, fmt.signed, out, eo)
        if n_over < 0:
            k = -1 - n_over
            raise FormatError(
                f"requantize: input exponents differ inside output block {k % nblk} of row "
                f"{k // nblk}; dynamic blocks need one input exponent per block"
            )
        exp = np.ascontiguousarray(rows_restore(eo, moved, axis).astype(np.int32))
    data = rows_restore(out, moved, axis)
    return QTensor(np.ascontiguousarray(data), fmt, exp, None, {"overflow": int(n_over)})


def requantize_ref(x: np.ndarray, e_in: np.ndarray, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Plain-Python twin of :func:`requantize`."""
    x, e_full = _setup(x, e_in, fmt)
    axis = fmt.block_axis % x.ndim
    n = x.shape[axis]
    bs = effective_block(n, fmt.block_size)
    bshape = blocks_shape(x.shape, axis, fmt.block_size)
    hi = fmt.qmax
    out = np.empty(x.shape, np.int64)
    n_over = 0
    if exp_out is not None:
        eo = np.broadcast_to(np.asarray(exp_out), bshape)
    else:
        eo = np.empty(bshape, np.int64)
    for bidx in np.ndindex(*bshape):
        members = []
        for j in range(bidx[axis] * bs, min(n, (bidx[axis] + 1) * bs)):
            idx = list(bidx)
            idx[axis] = j
            members.append(tuple(idx))
        if exp_out is None:
            e0 = int(e_full[members[0]])
            if any(int(e_full[m]) != e0 for m in members):
                raise FormatError(f"requantize: input exponents differ inside output block {bidx}")
            vals = [int(x[m]) for m in members]
            if not any(vals):
                eo[bidx] = EXP_ZERO
                for m in members:
                    out[m] = 0
                continue
            amax = max(abs(v) for v in vals)
            s = amax.bit_length() - (fmt.bits - 1 if fmt.signed else fmt.bits)
            if shift_round_ref(amax, s, fmt.rounding) > hi:  # rounded up to 2**(bits-1): one more bit
                s += 1
            eo[bidx] = e0 + s
            shifts = {m: s for m in members}
        else:
            shifts = {m: min(62, int(eo[bidx]) - int(e_full[m])) for m in members}
        for m in members:
            v, s = int(x[m]), shifts[m]
            q = shift_round_ref(v, s, fmt.rounding)  # Python ints: a huge left shift stays exact
            y, over = saturate_ref(q, fmt.bits, fmt.signed, fmt.saturation)
            n_over += over
            out[m] = y
    return QTensor(out.astype(fmt.dtype), fmt, np.asarray(eo, np.int32).copy(), None, {"overflow": int(n_over)})


@nb.njit(cache=True)
def _mult_flat(x, m, s, mode, lo, hi, wrap, bits, out):
    n_over = 0
    for i in range(x.size):
        y, over = _shift_narrow(x[i] * m[i], s[i], mode, lo, hi, wrap, bits)
        if over:
            n_over += 1
        out[i] = y
    return n_over


@nb.njit(cache=True)
def _mult_rows(x, m, s_row, mode, lo, hi, wrap, bits, out):
    """:func:`_mult_flat` for one multiplier and one shift per row of ``x`` (rows, n): the
    product row (int64, in a row of scratch), then one per-block narrowing into ``out`` (any
    integer dtype that holds ``lo..hi``). Returns (overflow count, max, min) with max/min over
    ``x`` and 0, for the caller's range check."""
    rows, n = x.shape
    n_over = 0
    gmx = np.int64(0)
    gmn = np.int64(0)
    am = abs(m)
    pr = np.empty(n, np.int64)
    for r in range(rows):
        xr = x[r]
        mx, mn = extent(xr)
        gmx = max(gmx, mx)
        gmn = min(gmn, mn)
        for j in range(n):
            pr[j] = xr[j] * m
        n_over += _narrow_block(pr, s_row[r], max(mx, -mn) * am, mode, lo, hi, wrap, bits, out[r])
    return n_over, gmx, gmn


def _mult_setup(x, multiplier, shift):
    x = require_int("requantize_mult: x", x).astype(np.int64, copy=False)
    m = np.broadcast_to(require_int("requantize_mult: multiplier", np.asarray(multiplier)), x.shape)
    s = np.broadcast_to(require_int("requantize_mult: shift", np.asarray(shift)), x.shape)
    if x.size:
        big = int(np.max(np.abs(x))) * int(np.max(np.abs(m)))
        if big >= _LIMIT:
            raise ValueError(f"requantize_mult: |x * multiplier| reaches {big}, must stay below 2**62")
    return x, m.astype(np.int64), s.astype(np.int64)


def requantize_mult(
    x: np.ndarray,
    multiplier: int | np.ndarray,
    shift: int | np.ndarray,
    bits: int,
    signed: bool = True,
    rounding: Rounding = Rounding.RND_CONV,
    saturation: Saturation = Saturation.SAT,
    dtype: type = np.int64,
) -> tuple[np.ndarray, int]:
    """``sat((x * multiplier) >>r shift)`` elementwise; returns (codes, overflow events).

    ``multiplier`` and ``shift`` broadcast to ``x`` (per-channel constants); the product is
    formed exactly in int64 (``|x * multiplier| < 2**62``, checked), shifted once with
    ``rounding`` (shifts beyond 62 taken as 62, negative shifts are exact left shifts) and
    narrowed to ``bits`` with ``saturation``. The TFLite/gemmlowp fixed-point rescale idiom.
    The codes are returned in the integer ``dtype`` (int64 by default; a narrower one must
    hold every ``bits``-bit code, checked), written there directly, with no int64 copy.
    """
    lo, hi, wrap = sat_bounds(bits, signed, saturation)
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or not (np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max):
        raise ValueError(f"requantize_mult: dtype {dtype} does not hold {bits}-bit codes")
    xa, ma = require_int("requantize_mult: x", x), require_int("requantize_mult: multiplier", np.asarray(multiplier))
    s_row = _per_row(require_int("requantize_mult: shift", np.asarray(shift)), xa.shape, -1)
    if ma.size == 1 and s_row is not None and xa.size:  # one multiplier, one shift per row
        xr = np.ascontiguousarray(xa, np.int64).reshape(-1, xa.shape[-1])
        m = int(ma.ravel()[0])
        out = np.empty(xr.shape, dtype)
        n, mx, mn = _mult_rows(xr, np.int64(m), s_row, int(rounding), lo, hi, wrap, bits, out)
        big = max(int(mx), -int(mn)) * abs(m)
        if big >= _LIMIT:
            raise ValueError(f"requantize_mult: |x * multiplier| reaches {big}, must stay below 2**62")
        return out.reshape(xa.shape), int(n)
    x, m, s = _mult_setup(x, multiplier, shift)
    out = np.empty(x.size, np.int64)
    n = _mult_flat(
        np.ascontiguousarray(x).ravel(),
        np.ascontiguousarray(m).ravel(),
        np.ascontiguousarray(s).ravel(),
        int(rounding),
        lo,
        hi,
        wrap,
        bits,
        out,
    )
    return out.reshape(x.shape).astype(dtype, copy=False), int(n)


def requantize_mult_ref(
    x: np.ndarray,
    multiplier: int | np.ndarray,
    shift: int | np.ndarray,
    bits: int,
    signed: bool = True,
    rounding: Rounding = Rounding.RND_CONV,
    saturation: Saturation = Saturation.SAT,
) -> tuple[np.ndarray, int]:
    """Plain-Python twin of :func:`requantize_mult`."""
    x, m, s = _mult_setup(x, multiplier, shift)
    out = np.empty(x.shape, np.int64)
    n = 0
    for idx in np.ndindex(*x.shape):
        q = shift_round_ref(int(x[idx]) * int(m[idx]), min(62, int(s[idx])), rounding)
        y, over = saturate_ref(q, bits, signed, saturation)
        out[idx] = y
        n += over
    return out, n


def quantize_multiplier(real: float, mult_bits: int = 15) -> tuple[int, int]:
    """(M, shift) with ``real ~= M * 2**-shift`` and M in ``[2**(mult_bits-1), 2**mult_bits)``.

    Lowering helper (floats allowed): relative error below ``2**-mult_bits``.
    """
    if not (real > 0 and math.isfinite(real)):
        raise ValueError(f"quantize_multiplier: real={real!r} must be positive and finite")
    mant, e = math.frexp(real)  # real = mant * 2**e, mant in [0.5, 1)
    m = round(mant * (1 << mult_bits))
    shift = mult_bits - e
    if m == 1 << mult_bits:
        m //= 2
        shift -= 1
    return int(m), int(shift)
