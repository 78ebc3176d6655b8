"""add: residual sum of two block-scaled tensors, exponent alignment, then requantization.

Contract: for every element, ``s = a * 2**ea + b * 2**eb`` is formed exactly at the
common exponent ``e = min(ea, eb)`` (the operand with the larger exponent is shifted
left by ``|ea - eb|``; when that exceeds 30 bits, ``e = max(ea, eb) - 30`` and the smaller
operand is shifted right with the output format's rounding instead, so the int64 sum is
bounded by ``2**(bits + 31)``). Inside every output block the sums are brought to the
block's smallest ``e`` (left shifts, exact), then :func:`kernels.requantize.requantize`
narrows them to ``fmt`` with static ``exp_out`` or dynamic block exponents.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from kernels.blocks import effective_block, rows_restore, rows_view
from kernels.formats import (
    FormatError,
    IntFormat,
    QTensor,
    expand_blocks,
    shift_round,
    shift_round_ref,
)
from kernels.requantize import requantize, requantize_ref

MAX_ALIGN = 30


def _operands(a: QTensor, b: QTensor):
    if a.shape != b.shape:
        raise FormatError(f"add: shapes differ: {a.shape} vs {b.shape}")
    out = []
    for q in (a, b):
        e = expand_blocks(np.asarray(q.exp, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
        v = np.asarray(q.data, np.int64)
        if q.mant is not None:
            v = v * expand_blocks(np.asarray(q.mant, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
        out += [v, e]
    return out


@nb.njit(cache=True)
def _sum_rows(a, ea, b, eb, bs, mode, out, e_out):
    rows, n = a.shape
    for r in range(rows):
        for j0 in range(0, n, bs):
            j1 = min(n, j0 + bs)
            eblk = np.int64(1 << 40)
            for j in range(j0, j1):  # the exponent each element's exact sum would have
                e = min(ea[r, j], eb[r, j])
                e = max(e, max(ea[r, j], eb[r, j]) - 30)
                if e < eblk:
                    eblk = e
            for j in range(j0, j1):
                e = max(min(ea[r, j], eb[r, j]), max(ea[r, j], eb[r, j]) - 30)
                s = shift_round(a[r, j], e - ea[r, j], mode) + shift_round(b[r, j], e - eb[r, j], mode)
                out[r, j] = s << (e - eblk)
                e_out[r, j] = eblk


def _exact_sum(a: QTensor, b: QTensor, fmt: IntFormat, ref: bool):
    av, ea, bv, eb = _operands(a, b)
    axis = fmt.block_axis
    ar, moved = rows_view(av, axis)
    bs = effective_block(ar.shape[1], fmt.block_size)
    br = rows_view(bv, axis)[0]
    ear = rows_view(np.asarray(ea), axis)[0]
    ebr = rows_view(np.asarray(eb), axis)[0]
    out = np.empty(ar.shape, np.int64)
    e_out = np.empty(ar.shape, np.int64)
    if not ref:
        _sum_rows(ar, ear, br, ebr, max(bs, 1), int(fmt.rounding), out, e_out)
    else:
        for r in range(ar.shape[0]):
            for j0 in range(0, ar.shape[1], bs):
                js = range(j0, min(ar.shape[1], j0 + bs))
                es = {
                    j: max(min(int(ear[r, j]), int(ebr[r, j])), max(int(ear[r, j]), int(ebr[r, j])) - MAX_ALIGN)
                    for j in js
                }
                eblk = min(es.values())
                for j in js:
                    e = es[j]
                    s = shift_round_ref(int(ar[r, j]), e - int(ear[r, j]), fmt.rounding) + shift_round_ref(
                        int(br[r, j]), e - int(ebr[r, j]), fmt.rounding
                    )
                    out[r, j] = s << (e - eblk)
                    e_out[r, j] = eblk
    return rows_restore(out, moved, axis), rows_restore(e_out, moved, axis)


def add(a: QTensor, b: QTensor, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Numba kernel; see the module docstring."""
    s, e = _exact_sum(a, b, fmt, ref=False)
    return requantize(s, e, fmt, exp_out)


def add_ref(a: QTensor, b: QTensor, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Plain-Python twin of :func:`add`."""
    s, e = _exact_sum(a, b, fmt, ref=True)
    return requantize_ref(s, e, fmt, exp_out)
