"""add: residual sum of two block-scaled tensors, exponent alignment, then requantization.

Contract (what a block-floating-point residual adder implements):

* Operands: ``a`` and ``b`` QTensors of the same shape; element values
  ``va = qa * mant_a`` (``mant`` = 1 for POW2) at exponent ``ea``, likewise ``vb`` at ``eb``
  (each operand's exponent is that of its own block). ``|va|, |vb| < 2**31`` (checked:
  stored formats are at most 32 bits, MULT ``bits + mant_bits`` at most 31).
* Alignment, per *output* block (``fmt``'s blocks): let ``E`` be the exponents of both
  operands over the block, ignoring ``EXP_ZERO`` (all-zero blocks). The common exponent is
  ``e = max(min(E), max(E) - 30)``; with ``a`` and ``b`` blocked like ``fmt`` that is
  ``min(ea, eb)`` unless the two differ by more than 30. Each operand is brought to ``e``
  with ``v >>r (e - e_v)``: a left shift of at most 30 bits (exact) or, for an operand more
  than 30 exponent steps below the largest, a right shift rounded with ``fmt.rounding``
  (shifts beyond 62 taken as 62). The sum ``s = va' + vb'`` is then exact in int64
  (``|s| < 2 * 2**31 * 2**30 = 2**62``). A block with no exponent left is all zero.
* Output: :func:`bbct.kernels.requantize.requantize` of ``s`` at ``e`` (constant per output
  block) to ``fmt``: static with ``exp_out``, else dynamic; ``meta['overflow']`` counts
  its saturations. Exact sums mean the result is the correctly rounded sum whenever
  ``|ea - eb| <= 30``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.blocks import effective_block, rows_restore, rows_view
from bbct.kernels.blockshift import shift_consts, shift_el
from bbct.kernels.formats import (
    EXP_ZERO,
    FormatError,
    IntFormat,
    QTensor,
    expand_blocks,
    shift_round,
    shift_round_ref,
)
from bbct.kernels.requantize import requantize, requantize_blocks, requantize_ref

__all__ = ["MAX_ALIGN", "add", "add_ref"]

MAX_ALIGN = 30  # most bits an operand is shifted left to meet the common exponent
_OPERAND_LIMIT = 1 << 31


def _operands(a: QTensor, b: QTensor) -> list[np.ndarray]:
    if a.shape != b.shape:
        raise FormatError(f"add: shapes differ: {a.shape} vs {b.shape}")
    out = []
    for name, q in (("a", a), ("b", b)):
        e = expand_blocks(np.asarray(q.exp, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
        v = np.asarray(q.data, np.int64)
        if q.mant is not None:
            v = v * expand_blocks(np.asarray(q.mant, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
        if v.size and int(np.max(np.abs(v))) >= _OPERAND_LIMIT:
            raise ValueError(f"add: operand {name} has |value| {int(np.max(np.abs(v)))}, must stay below 2**31")
        out += [v, e]
    return out


@nb.njit(cache=True)
def _sum_rows(a, ea, b, eb, bs, mode, out, e_out):
    rows, n = a.shape
    for r in range(rows):
        for j0 in range(0, n, bs):
            j1 = min(n, j0 + bs)
            emin = np.int64(1) << 40
            emax = -(np.int64(1) << 40)
            for j in range(j0, j1):
                for e in (ea[r, j], eb[r, j]):
                    if e != EXP_ZERO:
                        emin = min(emin, e)
                        emax = max(emax, e)
            if emax < emin:  # every operand block is all zero
                e = np.int64(EXP_ZERO)
            else:
                e = max(emin, emax - MAX_ALIGN)
            for j in range(j0, j1):
                sa = min(62, e - ea[r, j])
                sb = min(62, e - eb[r, j])
                out[r, j] = shift_round(a[r, j], sa, mode) + shift_round(b[r, j], sb, mode)
                e_out[r, j] = e


def _sum_rows_ref(a, ea, b, eb, bs, mode, out, e_out):
    rows, n = a.shape
    for r in range(rows):
        for j0 in range(0, n, bs):
            js = range(j0, min(n, j0 + bs))
            exps = [int(e) for j in js for e in (ea[r, j], eb[r, j]) if e != EXP_ZERO]
            e = max(min(exps), max(exps) - MAX_ALIGN) if exps else EXP_ZERO
            for j in js:
                sa = min(62, e - int(ea[r, j]))
                sb = min(62, e - int(eb[r, j]))
                out[r, j] = shift_round_ref(int(a[r, j]), sa, mode) + shift_round_ref(int(b[r, j]), sb, mode)
                e_out[r, j] = e


def _exact_sum(a: QTensor, b: QTensor, fmt: IntFormat, ref: bool) -> tuple[np.ndarray, np.ndarray]:
    av, ea, bv, eb = _operands(a, b)
    axis = fmt.block_axis
    ar, moved = rows_view(av, axis)
    bs = max(effective_block(ar.shape[1], fmt.block_size), 1)
    br = rows_view(bv, axis)[0]
    ear = rows_view(np.asarray(ea), axis)[0]
    ebr = rows_view(np.asarray(eb), axis)[0]
    out = np.empty(ar.shape, np.int64)
    e_out = np.empty(ar.shape, np.int64)
    (_sum_rows_ref if ref else _sum_rows)(ar, ear, br, ebr, bs, int(fmt.rounding), out, e_out)
    return rows_restore(out, moved, axis), rows_restore(e_out, moved, axis)


@nb.njit(cache=True)
def _sum_blocks(a, ea, b, eb, bs, mode, out, e_blk):
    """:func:`_sum_rows` when both operands are blocked like the output: one exponent per
    operand and block, so one common exponent and two shifts per block, in one loop."""
    rows, n = a.shape
    for r in range(rows):
        for k in range(e_blk.shape[1]):
            j0 = k * bs
            j1 = min(n, j0 + bs)
            xa, xb = np.int64(ea[r, k]), np.int64(eb[r, k])
            if xa == EXP_ZERO and xb == EXP_ZERO:
                e = np.int64(EXP_ZERO)
            elif xa == EXP_ZERO:
                e = xb
            elif xb == EXP_ZERO:
                e = xa
            else:
                e = max(min(xa, xb), max(xa, xb) - MAX_ALIGN)
            e_blk[r, k] = e
            ka, kb = shift_consts(e - xa, mode), shift_consts(e - xb, mode)
            av, bv, ov = a[r, j0:j1], b[r, j0:j1], out[r, j0:j1]
            for j in range(ov.size):
                ov[j] = shift_el(np.int64(av[j]), ka) + shift_el(np.int64(bv[j]), kb)


def _same_blocks(q: QTensor, fmt: IntFormat) -> np.ndarray | None:
    """``q``'s exponents as (rows, nblocks) when ``q`` is POW2 and blocked like ``fmt`` along
    the last axis (the residual stream's layout), else None."""
    nd = q.data.ndim
    e = np.asarray(q.exp)
    if not nd or q.mant is not None or q.fmt.block_axis % nd != nd - 1 or fmt.block_axis % nd != nd - 1:
        return None
    n = q.shape[-1]
    nblk = -(-n // effective_block(n, fmt.block_size)) if n else 0
    if effective_block(n, q.fmt.block_size) != effective_block(n, fmt.block_size) or e.ndim != nd:
        return None
    if e.shape[-1] != nblk:
        return None
    return np.broadcast_to(e, q.shape[:-1] + (nblk,)).reshape(-1, nblk).astype(np.int64)


def add(a: QTensor, b: QTensor, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Residual add ``a + b`` into the POW2 format ``fmt`` (module docstring has the contract).

    ``exp_out`` given: static requantization to those exponents (broadcastable to the
    blocks shape); None: dynamic block exponents. Returns a QTensor with
    ``meta['overflow']`` = saturated elements. Bit-identical to :func:`add_ref`.
    """
    ea, eb = _same_blocks(a, fmt), _same_blocks(b, fmt)
    if ea is not None and eb is not None and a.shape == b.shape and a.data.size:
        for name, q in (("a", a), ("b", b)):
            x = np.asarray(q.data)
            top = max(int(x.max()), -int(x.min()))
            if top >= _OPERAND_LIMIT:
                raise ValueError(f"add: operand {name} has |value| {top}, must stay below 2**31")
        n = a.shape[-1]
        ar, br = np.ascontiguousarray(a.data).reshape(-1, n), np.ascontiguousarray(b.data).reshape(-1, n)
        out = np.empty(ar.shape, np.int64)
        e_blk = np.empty(ea.shape, np.int64)
        bs = max(effective_block(n, fmt.block_size), 1)
        _sum_blocks(ar, ea, br, eb, bs, int(fmt.rounding), out, e_blk)
        return requantize_blocks(out, e_blk, fmt, exp_out, a.shape)
    s, e = _exact_sum(a, b, fmt, ref=False)
    return requantize(s, e, fmt, exp_out)


def add_ref(a: QTensor, b: QTensor, fmt: IntFormat, exp_out: np.ndarray | None = None) -> QTensor:
    """Plain-Python twin of :func:`add`."""
    s, e = _exact_sum(a, b, fmt, ref=True)
    return requantize_ref(s, e, fmt, exp_out)
