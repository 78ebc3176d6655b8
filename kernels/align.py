"""align: expand a block-scaled tensor to one exponent per group, for the MAC array.

Block floating point is a storage format; a dot product needs its operands on one grid.
For every group (the positions that share their indices on the axes *not* in
``reduce_axes``), with ``e[i]`` the exponent of element i's block:

    e_ref = max over the group of e[i], minus ``guard``   (EXP_ZERO blocks never win
            unless the whole group is zero)
    wide[i] = (q[i] * mant[i]) >>r (e_ref - e[i])         (mant = 1 for POW2)

A block within ``guard`` exponent steps of the group's largest is shifted left: exact.
Blocks further below lose their low bits with rounding mode ``r`` (a right shift; shifts
beyond 62 are taken as 62, so the result is 0 or -1/0/+1 as the mode gives). ``wide``
needs ``bits + guard (+ mant_bits)`` bits; ``bitlen(max |q * mant|) + guard <= 62`` is
checked so it is exact in int64. Returns ``(wide, e_ref)``: int64 of ``q``'s shape and
int32 with the reduced axes kept as size 1. This is the "expand block floating point to
wide fixed point in front of the MAC array" step of a block-FP datapath.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from bbct.kernels.blocks import effective_block
from bbct.kernels.blockshift import shift_block
from bbct.kernels.formats import QTensor, Rounding, expand_blocks, shift_round, shift_round_ref


def _check_guard(guard: int) -> None:
    if not isinstance(guard, (int, np.integer)) or not 0 <= int(guard) <= 30:
        raise ValueError(f"align: guard={guard!r} must be an integer in 0..30")


def _expand(q: QTensor, guard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    _check_guard(guard)
    e = expand_blocks(np.asarray(q.exp, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
    m = None
    if q.mant is not None:
        m = expand_blocks(np.asarray(q.mant, np.int64), q.shape, q.fmt.block_axis, q.fmt.block_size)
    x = np.asarray(q.data)
    if x.size:
        top = int(np.max(np.abs(x.astype(np.int64))))
        if m is not None:
            top *= int(np.max(m))
        if top.bit_length() + int(guard) > 62:
            raise ValueError(f"align: |q*mant| up to {top} shifted left by guard={guard} exceeds 62 bits")
    return e, x, m


def _e_ref(e: np.ndarray, reduce_axes: tuple[int, ...], guard: int) -> np.ndarray:
    axes = tuple(sorted({a % e.ndim for a in reduce_axes}))
    return (np.max(e, axis=axes, keepdims=True) - guard).astype(np.int32)


@nb.njit(cache=True)
def _align_flat(x, m, s, mode, out):
    for i in range(x.size):
        v = np.int64(x[i])
        if m is not None:
            v = v * m[i]
        sh = s[i]
        if sh > 62:
            sh = 62
        out[i] = shift_round(v, sh, mode)


@nb.njit(cache=True)
def _align_rows(x, e, per, bs, guard, mode, out, e_ref):
    """One group per ``per`` consecutive rows of ``x`` (rows, n), blocks of ``bs`` along each
    row with exponents ``e`` (rows, nblocks): the module docstring's rule, one shift per block."""
    rows, n = x.shape
    for g in range(rows // per):
        r0 = g * per
        top = e[r0, 0]
        for r in range(r0, r0 + per):
            for b in range(e.shape[1]):
                top = max(top, e[r, b])
        ref = top - guard
        e_ref[g] = ref
        for r in range(r0, r0 + per):
            for b in range(e.shape[1]):
                j0 = b * bs
                j1 = min(n, j0 + bs)
                shift_block(x[r, j0:j1], np.int64(ref) - e[r, b], mode, out[r, j0:j1])


def _trailing_groups(q: QTensor, reduce_axes: tuple[int, ...]) -> int:
    """How many trailing axes the groups span (the reduced axes are the last ones, the last
    being the block axis, scales POW2: every group is a run of whole rows), else 0."""
    nd = q.data.ndim
    e = np.asarray(q.exp)
    axes = tuple(sorted({a % nd for a in reduce_axes})) if nd else ()
    ok = (
        nd >= 1
        and q.mant is None
        and bool(axes)
        and axes == tuple(range(nd - len(axes), nd))
        and q.fmt.block_axis % nd == nd - 1
        and e.ndim == nd
        and e.shape[-1] in (1, -(-q.shape[-1] // effective_block(q.shape[-1], q.fmt.block_size)) if q.shape[-1] else 1)
    )
    return len(axes) if ok else 0


def align(q: QTensor, reduce_axes: tuple[int, ...], guard: int, rounding: Rounding) -> tuple[np.ndarray, np.ndarray]:
    """Bring ``q`` to one exponent per group of the non-reduced axes (module docstring).

    Args:
        q: block-scaled tensor (POW2 or MULT). reduce_axes: the axes a group spans (the
            dot-product axis, e.g. ``(-1,)`` for activations, ``(0, 1)`` for a weight).
        guard: extra low bits kept below the group's largest block (0..30).
        rounding: mode of the right shifts of smaller blocks.

    Returns:
        ``(wide int64, e_ref int32)``; bit-identical to :func:`align_ref`.
    """
    k = _trailing_groups(q, reduce_axes)
    if k and q.data.size:
        _check_guard(guard)
        x = np.ascontiguousarray(q.data)
        n = x.shape[-1]
        top = max(int(x.max()), -int(x.min()))
        if top.bit_length() + int(guard) > 62:
            raise ValueError(f"align: |q*mant| up to {top} shifted left by guard={guard} exceeds 62 bits")
        ex = np.asarray(q.exp)
        e2 = np.broadcast_to(ex, x.shape[:-1] + ex.shape[-1:]).reshape(-1, ex.shape[-1]).astype(np.int64)
        out = np.empty(x.shape, np.int64)
        gshape = x.shape[: x.ndim - k]
        e_ref = np.empty(int(np.prod(gshape)), np.int64)
        bs = n if ex.shape[-1] == 1 else effective_block(n, q.fmt.block_size)
        per = int(np.prod(x.shape[x.ndim - k : -1]))
        _align_rows(x.reshape(-1, n), e2, per, bs, int(guard), int(rounding), out.reshape(-1, n), e_ref)
        return out, e_ref.astype(np.int32).reshape(gshape + (1,) * k)
    e, x, m = _expand(q, guard)
    e_ref = _e_ref(e, reduce_axes, guard)
    s = np.ascontiguousarray(np.broadcast_to(e_ref, x.shape) - e).ravel()
    out = np.empty(x.size, np.int64)
    mf = None if m is None else np.ascontiguousarray(m).ravel()
    _align_flat(np.ascontiguousarray(x).ravel(), mf, s, int(rounding), out)
    return out.reshape(x.shape), e_ref


def align_ref(
    q: QTensor, reduce_axes: tuple[int, ...], guard: int, rounding: Rounding
) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python twin of :func:`align`."""
    e, x, m = _expand(q, guard)
    e_ref = _e_ref(e, reduce_axes, guard)
    eb = np.broadcast_to(e_ref, x.shape)
    out = np.empty(x.shape, np.int64)
    for idx in np.ndindex(*x.shape):
        v = int(x[idx]) * (1 if m is None else int(m[idx]))
        out[idx] = shift_round_ref(v, min(62, int(eb[idx]) - int(e[idx])), rounding)
    return out, e_ref
