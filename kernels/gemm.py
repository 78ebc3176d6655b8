"""gemm: integer matrix product of aligned operands, bias, accumulator narrowing.

Contract (what the RTL implements):

* ``a``: int64 ``(..., M, K)`` at exponent ``ea`` ``(..., M, 1)`` (one per row, from
  :func:`kernels.align.align`); ``b``: int64 ``(..., K, N)`` at exponent ``eb``
  broadcastable to ``(..., 1, 1)``; leading batch axes broadcast.
* The adder tree is exact: ``s[m, n] = sum_k a[m, k] * b[k, n]`` with no intermediate
  rounding (internal width ``bits_a + bits_b + ceil(log2 K)``).
* Bias (optional, int per column at exponent ``e_bias``) is aligned to the accumulator's
  exponent ``e_acc = ea + eb`` as ``bias >>r (e_acc - e_bias)`` (rounding ``bias_rounding``)
  and added exactly.
* Write-back narrows the sum to ``acc_bits`` with ``acc_saturation`` (SAT / SAT_SYM clip,
  WRAP keeps the low bits); every output whose value changes is one overflow event.

Returns ``(acc int64 (..., M, N), e_acc int32 (..., M, 1), overflow events)``.

Speed: when ``max|a| * max|b| * K < 2**53`` every product and every partial sum is an
integer below 2**53 in magnitude, hence exactly representable in float64, and IEEE
addition of such integers is exact in any order — so float64 BLAS returns the exact sum.
Otherwise an int64 Numba loop computes it (exact while ``max|a| * max|b| * K < 2**63``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from kernels.formats import (
    Rounding,
    Saturation,
    require_int,
    sat_bounds,
    saturate,
    saturate_ref,
    shift_round,
    shift_round_ref,
)

EXACT_F64 = 1 << 53


@nb.njit(cache=True, parallel=False)
def _matmul_i64(a, b, out):
    bt, m_, k_ = a.shape
    n_ = b.shape[2]
    for t in range(bt):
        tb = t if b.shape[0] > 1 else 0
        for i in range(m_):
            for j in range(n_):
                s = np.int64(0)
                for k in range(k_):
                    s += a[t, i, k] * b[tb, k, j]
                out[t, i, j] = s


@nb.njit(cache=True)
def _writeback(acc, e_acc, bias, e_bias, mode, lo, hi, wrap, bits, use_bias):
    bt, m_, n_ = acc.shape
    n_over = 0
    for t in range(bt):
        for i in range(m_):
            s = np.int64(e_acc[t, i]) - e_bias
            if s > 62:
                s = 62
            for j in range(n_):
                v = acc[t, i, j]
                if use_bias:
                    v += shift_round(bias[j], s, mode)
                y = saturate(v, lo, hi, wrap, bits)
                if y != v:
                    n_over += 1
                acc[t, i, j] = y
    return n_over


def _check(a, ea, b, eb, acc_bits, bias):
    a = require_int("gemm: a", a).astype(np.int64, copy=False)
    b = require_int("gemm: b", b).astype(np.int64, copy=False)
    ea = require_int("gemm: ea", ea)
    eb = require_int("gemm: eb", eb)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: shapes {a.shape} and {b.shape} do not multiply")
    if not 2 <= acc_bits <= 62:
        raise ValueError(f"gemm: acc_bits={acc_bits} must be in 2..62")
    if bias is not None:
        bias = require_int("gemm: bias", bias).astype(np.int64, copy=False)
        if bias.shape != (b.shape[-1],):
            raise ValueError(f"gemm: bias shape {bias.shape}, expected ({b.shape[-1]},)")
    k = a.shape[-1]
    amax = int(np.max(np.abs(a))) if a.size else 0
    bmax = int(np.max(np.abs(b))) if b.size else 0
    if amax * bmax * max(k, 1) >= 1 << 63:
        raise ValueError(f"gemm: max|a|*max|b|*K = {amax * bmax * k} would overflow the int64 adder tree")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    e_acc = (np.broadcast_to(ea, batch + (a.shape[-2], 1)) + np.broadcast_to(eb, batch + (1, 1))).astype(np.int32)
    return a, b, bias, batch, e_acc, amax * bmax * max(k, 1)


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
    """Fast kernel: float64 BLAS when provably exact, else an int64 Numba loop."""
    a, b, bias, batch, e_acc, bound = _check(a, ea, b, eb, acc_bits, bias)
    m_, n_ = a.shape[-2], b.shape[-1]
    if bound < EXACT_F64:
        acc = np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
        if acc.shape != batch + (m_, n_):  # b carried the batch axes, a did not
            acc = np.broadcast_to(acc, batch + (m_, n_)).copy()
    else:
        a3 = np.ascontiguousarray(np.broadcast_to(a, batch + a.shape[-2:])).reshape(-1, m_, a.shape[-1])
        b3 = (
            b.reshape(-1, b.shape[-2], n_)
            if b.ndim == 2 or not batch
            else np.ascontiguousarray(np.broadcast_to(b, batch + b.shape[-2:])).reshape(-1, b.shape[-2], n_)
        )
        acc = np.empty((a3.shape[0], m_, n_), np.int64)
        _matmul_i64(a3, np.ascontiguousarray(b3), acc)
        acc = acc.reshape(batch + (m_, n_))
    lo, hi, wrap = sat_bounds(acc_bits, True, acc_saturation)
    acc3 = acc.reshape(-1, m_, n_)
    n_over = _writeback(
        acc3,
        e_acc.reshape(-1, m_),
        np.zeros(1, np.int64) if bias is None else bias,
        int(e_bias),
        int(bias_rounding),
        lo,
        hi,
        wrap,
        acc_bits,
        bias is not None,
    )
    return acc3.reshape(batch + (m_, n_)), e_acc, int(n_over)


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
    """Plain-Python twin of :func:`gemm` (Python-int dot products)."""
    a, b, bias, batch, e_acc, _ = _check(a, ea, b, eb, acc_bits, bias)
    m_, k_, n_ = a.shape[-2], a.shape[-1], b.shape[-1]
    ab = np.broadcast_to(a, batch + (m_, k_))
    bb = np.broadcast_to(b, batch + (k_, n_))
    out = np.empty(batch + (m_, n_), np.int64)
    n_over = 0
    for t in np.ndindex(*batch):
        for i in range(m_):
            row = [int(v) for v in ab[t + (i,)]]
            for j in range(n_):
                s = sum(row[k] * int(bb[t + (k, j)]) for k in range(k_))
                if bias is not None:
                    sh = min(62, int(e_acc[t + (i, 0)]) - int(e_bias))
                    s += shift_round_ref(int(bias[j]), sh, bias_rounding)
                y, over = saturate_ref(s, acc_bits, True, acc_saturation)
                n_over += over
                out[t + (i, j)] = y
    return out, e_acc, n_over
