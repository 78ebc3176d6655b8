"""gemm: integer matrix product of aligned operands into a narrow accumulator, plus bias.

Contract (what the RTL implements, one MAC per output):

* ``a``: int64 ``(..., M, K)`` at exponent ``ea`` ``(..., M, 1)`` (one per row, from
  :func:`bbct.kernels.align.align`); ``b``: int64 ``(..., K, N)`` or ``(K, N)`` at exponent
  ``eb`` broadcastable to ``(..., 1, 1)``; leading batch axes (batch, heads) broadcast.
  ``max|a| * max|b| < 2**62`` (checked) so every product fits the int64 datapath.
* Accumulation is sequential and narrowed after every add::

      acc = 0
      for k in 0..K-1:  acc = sat_acc(acc + a[m, k] * b[k, n])

  ``sat_acc`` narrows to ``acc_bits`` (signed, 2..62) with ``acc_saturation``: SAT / SAT_SYM
  clip, WRAP keeps the low ``acc_bits`` bits. Every narrowing that changes the value is one
  overflow event (an output can have several).
* Bias (optional, one int per column at exponent ``e_bias``): aligned to the accumulator's
  exponent ``e_acc = ea + eb`` as ``bias >>r (e_acc - e_bias)`` with ``bias_rounding``
  (right shifts beyond 62 are taken as 62; a left shift must keep the aligned bias below
  2**61 — checked), then ``acc = sat_acc(acc + bias')``, counted like any other add.

Returns ``(acc int64 (..., M, N), e_acc int32 (..., M, 1), overflow events)``.

How it is computed fast, without changing a bit of that contract:

1. Exactness of float BLAS. Let ``P = max|a| * max|b| * K``. Every product is an integer
   of magnitude <= ``max|a| * max|b|``; every partial sum a BLAS forms, in *any* order or
   blocking (and with or without FMA), is a sum of a subset of the K products, so it is an
   integer of magnitude <= P. IEEE binary64 represents every integer of magnitude <= 2**53
   (binary32: 2**24), and an add/multiply/FMA whose exact result is representable returns
   it unrounded. Hence, if ``P < 2**53`` (``P < 2**24``), float64 (float32) ``matmul`` of
   the integer operands returns the exact integer sum, by induction over the operations.
2. No overflow event possible. Any prefix sum of output (m, n) is bounded by
   ``B[m, n] = sum_k |a[m, k]| |b[k, n]| <= min(rowmax|a|_m * colsum|b|_n,
   rowsum|a|_m * colmax|b|_n)``. If ``B[m, n] <= 2**(acc_bits-1) - 1`` no narrowing changes
   any prefix, so the sequential result is the exact sum of step 1. Both bound factors are
   integers whose product is <= P < 2**53, so this test is itself exact in float64.
3. Outputs whose bound does not prove step 2 are recomputed by the sequential int64 Numba
   loop (the contract verbatim, counting events). If ``P >= 2**53`` the loop runs for all.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.formats import (
    Rounding,
    Saturation,
    bit_length_ref,
    require_int,
    sat_bounds,
    saturate,
    saturate_ref,
    shift_round_array,
    shift_round_ref,
)

__all__ = ["EXACT_F64", "EXACT_F32", "gemm", "gemm_ref"]

EXACT_F64 = 1 << 53  # every integer of magnitude <= 2**53 is a float64
EXACT_F32 = 1 << 24  # ... <= 2**24 is a float32


@nb.njit(cache=True, inline="always")
def _mac(a, b, t, tb, i, j, lo, hi, wrap, bits):
    """One output by the contract: sequential adds, narrowed after each; (acc, events)."""
    s = np.int64(0)
    n_over = 0
    for k in range(a.shape[2]):
        v = s + a[t, i, k] * b[tb, k, j]
        s = saturate(v, lo, hi, wrap, bits)
        if s != v:
            n_over += 1
    return s, n_over


@nb.njit(cache=True, inline="always")
def _plus_bias(s, tab, r, j, lo, hi, wrap, bits):
    """``sat_acc(acc + bias')`` with the aligned bias from row ``r`` of the table; (acc, event)."""
    v = s + tab[r, j]
    y = saturate(v, lo, hi, wrap, bits)
    return y, y != v


@nb.njit(cache=True)
def _gemm_seq(a, b, rid, tab, use_bias, lo, hi, wrap, bits, out):
    bt, m_, _ = a.shape
    n_ = b.shape[2]
    n_over = 0
    for t in range(bt):
        tb = t if b.shape[0] > 1 else 0
        for i in range(m_):
            r = rid[t * m_ + i]
            for j in range(n_):
                s, c = _mac(a, b, t, tb, i, j, lo, hi, wrap, bits)
                if use_bias:
                    s, ov = _plus_bias(s, tab, r, j, lo, hi, wrap, bits)
                    c += ov
                out[t, i, j] = s
                n_over += c
    return n_over


@nb.njit(cache=True)
def _gemm_seq_at(a, b, idx, rid, tab, use_bias, lo, hi, wrap, bits, out):
    """The sequential loop (and bias) on the listed outputs only (rows of ``idx``: t, i, j)."""
    m_ = a.shape[1]
    n_over = 0
    for q in range(idx.shape[0]):
        t, i, j = idx[q, 0], idx[q, 1], idx[q, 2]
        tb = t if b.shape[0] > 1 else 0
        s, c = _mac(a, b, t, tb, i, j, lo, hi, wrap, bits)
        if use_bias:
            s, ov = _plus_bias(s, tab, rid[t * m_ + i], j, lo, hi, wrap, bits)
            c += ov
        out[t, i, j] = s
        n_over += c
    return n_over


@nb.njit(cache=True)
def _finish(accf, rid, tab, use_bias, skip, lo, hi, wrap, bits, out):
    """Exact float sums (module docstring, steps 1-2) -> int64, plus the aligned bias with
    narrowing. Outputs marked in ``skip`` are left for :func:`_gemm_seq_at`."""
    bt, m_, n_ = accf.shape
    n_over = 0
    for t in range(bt):
        for i in range(m_):
            r = rid[t * m_ + i]
            for j in range(n_):
                if skip is not None and skip[t, i, j]:
                    continue
                s = np.int64(accf[t, i, j])  # an integer below 2**53: exact conversion
                if use_bias:
                    s, ov = _plus_bias(s, tab, r, j, lo, hi, wrap, bits)
                    n_over += ov
                out[t, i, j] = s
    return n_over


def _bias_table(bias, e_acc, e_bias, rounding, rows):
    """Aligned bias rows: one per distinct shift ``e_acc - e_bias`` (clamped to 62), and the
    table row of every accumulator row. Same values as shifting per element."""
    if bias is None:
        return np.zeros((rows,), np.int64), np.zeros((1, 1), np.int64)
    sh = np.minimum(e_acc.reshape(-1).astype(np.int64) - int(e_bias), 62)
    uniq, rid = np.unique(sh, return_inverse=True)
    tab = np.stack([shift_round_array(bias, int(u), rounding) for u in uniq]) if len(uniq) else np.zeros((1, 1))
    return np.ascontiguousarray(rid.astype(np.int64)), np.ascontiguousarray(tab.astype(np.int64))


def _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias):
    a = require_int("gemm: a", a).astype(np.int64, copy=False)
    b = require_int("gemm: b", b).astype(np.int64, copy=False)
    ea = require_int("gemm: ea", ea)
    eb = require_int("gemm: eb", eb)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: shapes {a.shape} and {b.shape} do not multiply")
    if not isinstance(acc_bits, (int, np.integer)) or not 2 <= int(acc_bits) <= 62:
        raise ValueError(f"gemm: acc_bits={acc_bits!r} must be an integer in 2..62")
    Saturation(int(acc_saturation))
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        e_acc = np.broadcast_to(ea, batch + (a.shape[-2], 1)).astype(np.int64) + np.broadcast_to(eb, batch + (1, 1))
    except ValueError:
        raise ValueError(
            f"gemm: a {a.shape} (ea {ea.shape}) and b {b.shape} (eb {eb.shape}) do not broadcast"
        ) from None
    k = a.shape[-1]
    amax = int(np.max(np.abs(a))) if a.size else 0
    bmax = int(np.max(np.abs(b))) if b.size else 0
    if amax * bmax >= 1 << 62:
        raise ValueError(f"gemm: max|a|*max|b| = {amax * bmax} must stay below 2**62 (int64 products)")
    if bias is not None:
        bias = require_int("gemm: bias", bias).astype(np.int64, copy=False)
        if bias.shape != (b.shape[-1],):
            raise ValueError(f"gemm: bias shape {bias.shape}, expected ({b.shape[-1]},)")
        bmx = int(np.max(np.abs(bias))) if bias.size else 0
        left = int(e_bias) - int(e_acc.min()) if e_acc.size else 0
        if bmx and left > 0 and bit_length_ref(bmx) + left > 61:
            raise ValueError(
                f"gemm: bias (max |bias| {bmx}) shifted left by {left} to the accumulator exponent "
                f"{int(e_acc.min())} needs more than 61 bits; lower e_bias"
            )
    return a, b, bias, batch, e_acc.astype(np.int32), amax * bmax * max(k, 1)


def gemm(
    a: np.ndarray,
    ea: np.ndarray,
    b: np.ndarray,
    eb: np.ndarray,
    acc_bits: int = 32,
    acc_saturation: Saturation = Saturation.SAT,
    bias: np.ndarray | None = None,
    e_bias: int = 0,
    bias_rounding: Rounding = Rounding.RND_CONV,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer GEMM with a narrow, per-add saturating accumulator (see the module docstring).

    Args:
        a: int ``(..., M, K)``, the aligned activations; ``ea`` their exponents ``(..., M, 1)``.
        b: int ``(..., K, N)`` or ``(K, N)``; ``eb`` broadcastable to ``(..., 1, 1)``.
        acc_bits: signed accumulator width, 2..62; ``acc_saturation``: its overflow mode.
        bias: optional int ``(N,)`` at exponent ``e_bias``, aligned with ``bias_rounding``.

    Returns:
        ``(acc, e_acc, events)``: int64 accumulators ``(..., M, N)`` in ``acc_bits``, their
        int32 exponents ``ea + eb`` ``(..., M, 1)``, and the number of narrowings that
        changed a value. Bit-identical to :func:`gemm_ref`.
    """
    a, b, bias, batch, e_acc, bound = _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias)
    m_, k_, n_ = a.shape[-2], a.shape[-1], b.shape[-1]
    lo, hi, wrap = sat_bounds(acc_bits, True, acc_saturation)
    out_shape = batch + (m_, n_)
    a3 = np.broadcast_to(a, batch + (m_, k_)).reshape(-1, m_, k_)
    b3 = b.reshape(1, k_, n_) if b.ndim == 2 else np.broadcast_to(b, batch + (k_, n_)).reshape(-1, k_, n_)
    n_over = 0
    rid, tab = _bias_table(bias, e_acc, e_bias, bias_rounding, a3.shape[0] * m_)
    use_bias = bias is not None
    acc = np.empty((a3.shape[0], m_, n_), np.int64)
    if bound < EXACT_F64:
        ft = np.float32 if bound < EXACT_F32 else np.float64  # exact: module docstring, step 1
        accf = np.matmul(a.astype(ft), b.astype(ft))
        if accf.shape != out_shape:  # b carried batch axes that a did not
            accf = np.broadcast_to(accf, out_shape)
        accf = accf.reshape(-1, m_, n_)
        skip, idx = None, None
        if bound > hi:  # step 2: find the outputs whose prefix sums might leave the range
            aa, ab = np.abs(a3).astype(np.float64), np.abs(b3).astype(np.float64)
            pb = np.minimum(
                aa.max(axis=2)[:, :, None] * ab.sum(axis=1)[:, None, :],
                aa.sum(axis=2)[:, :, None] * ab.max(axis=1)[:, None, :],
            )
            skip = np.ascontiguousarray(np.broadcast_to(pb, acc.shape) > hi)
            idx = np.argwhere(skip)
            if not len(idx):
                skip = None
        n_over += _finish(accf, rid, tab, use_bias, skip, lo, hi, wrap, acc_bits, acc)
        if skip is not None:
            a3c, b3c = np.ascontiguousarray(a3), np.ascontiguousarray(b3)
            n_over += _gemm_seq_at(a3c, b3c, idx.astype(np.int64), rid, tab, use_bias, lo, hi, wrap, acc_bits, acc)
    else:
        a3c, b3c = np.ascontiguousarray(a3), np.ascontiguousarray(b3)
        n_over += _gemm_seq(a3c, b3c, rid, tab, use_bias, lo, hi, wrap, acc_bits, acc)
    return acc.reshape(out_shape), e_acc, int(n_over)


def gemm_ref(
    a: np.ndarray,
    ea: np.ndarray,
    b: np.ndarray,
    eb: np.ndarray,
    acc_bits: int = 32,
    acc_saturation: Saturation = Saturation.SAT,
    bias: np.ndarray | None = None,
    e_bias: int = 0,
    bias_rounding: Rounding = Rounding.RND_CONV,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Plain-Python twin of :func:`gemm`: the contract's loops, Python ints."""
    a, b, bias, batch, e_acc, _ = _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias)
    m_, k_, n_ = a.shape[-2], a.shape[-1], b.shape[-1]
    ab = np.broadcast_to(a, batch + (m_, k_))
    bb = np.broadcast_to(b, batch + (k_, n_))
    out = np.empty(batch + (m_, n_), np.int64)
    n_over = 0
    for t in np.ndindex(*batch):
        bcols = bb[t].T.tolist()
        for i in range(m_):
            row = ab[t + (i,)].tolist()
            for j in range(n_):
                col = bcols[j]
                acc = 0
                for k in range(k_):
                    acc, over = saturate_ref(acc + row[k] * col[k], acc_bits, True, acc_saturation)
                    n_over += over
                if bias is not None:
                    sh = min(62, int(e_acc[t + (i, 0)]) - int(e_bias))
                    acc, over = saturate_ref(
                        acc + shift_round_ref(int(bias[j]), sh, bias_rounding), acc_bits, True, acc_saturation
                    )
                    n_over += over
                out[t + (i, j)] = acc
    return out, e_acc, n_over
