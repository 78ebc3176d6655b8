"""gemm: integer matrix product of aligned operands into a narrow accumulator, plus bias.

Contract (what the RTL implements, one MAC per output):

* ``a``: int64 ``(..., M, K)`` at exponent ``ea`` ``(..., M, 1)`` (one per row, from
  :func:`bbct.kernels.align.align`); ``b``: int64 ``(..., K, N)`` or ``(K, N)`` at exponent
  ``eb`` broadcastable to ``(..., 1, 1)``; leading batch axes (batch, heads) broadcast.
  Every operand value has ``|x| < 2**62`` and ``max|a| * max|b| < 2**62`` (checked: an
  int64 minimum or a uint64 above the int64 maximum is refused, never wrapped) so every
  product fits the int64 datapath. Exponents are int32 (checked, ``ea + eb`` too). An
  exponent at or below ``EXP_ZERO`` marks an all-zero operand row (``ea``) or matrix
  (``eb``), as :func:`~bbct.kernels.align.align` gives them (``EXP_ZERO - guard``); its
  data must be zero (checked).
* Accumulation is sequential and narrowed after every add::

      acc = 0
      for k in 0..K-1:  acc = sat_acc(acc + a[m, k] * b[k, n])

  ``sat_acc`` narrows to ``acc_bits`` (signed, 2..62) with ``acc_saturation``: SAT / SAT_SYM
  clip, WRAP keeps the low ``acc_bits`` bits. Every narrowing that changes the value is one
  overflow event (an output can have several).
* Bias (optional, one int per column, ``|bias| < 2**62``, at exponent ``e_bias``): aligned
  to the accumulator's exponent ``e_acc`` as ``bias' = bias >>r (e_acc - e_bias)`` with
  ``bias_rounding``, then ``acc = sat_acc(acc + bias')``, counted like any other add.
  Right shifts beyond 62 are taken as 62. A left shift (``e_bias > e_acc``) of up to 62
  steps is exact: an aligned bias beyond the int64 datapath (``|bias'| >= 2**62``) always
  leaves the accumulator, so SAT / SAT_SYM clip to the bias's sign and WRAP keeps the low
  ``acc_bits`` bits of the exact sum, one event either way. A left shift beyond 62 steps
  (the bias shifter's range) is refused.
* ``e_acc = ea + eb``, except for an all-zero row (exponent at or below ``EXP_ZERO``) when
  there is a bias: its products are all 0 and the bias alone decides the output, so the
  row takes the bias's own exponent, raised just enough for the bias to fit the
  accumulator: ``e_acc = e_bias + max(0, bitlen(max|bias|) - (acc_bits - 1))``. Then
  ``bias'`` is the bias itself, or the bias rounded right by that excess (only a value
  rounded up to ``2**(acc_bits-1)`` can still clip). Without a bias a zero row keeps
  ``ea + eb`` and the value 0.

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
   integers whose product is <= P < 2**53, so this test is exact in int64. When the largest
   row factor times the largest column factor already stays in range, no output is tested.
   A 2-D ``b`` (a linear layer) is one 2-D BLAS call over all rows of ``a``, never a
   stacked one (:func:`_float_matmul`).
3. Outputs whose bound does not prove step 2 are recomputed by the sequential int64 Numba
   loop (the contract verbatim, counting events). If ``P >= 2**53`` the loop runs for all.
4. The aligned bias is a table (one row per distinct shift). An entry with
   ``|bias'| >= 2**62`` is stored as a stand-in that gives the same narrowed sum for every
   accumulator value ``|acc| <= 2**61``: ``sign * 2**62`` (SAT, SAT_SYM: the sum is beyond
   the range on the bias's side) or ``bias' mod 2**acc_bits`` (WRAP: the same low bits),
   flagged so that its add counts an event although the stand-in sum may fit.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from threadpoolctl import ThreadpoolController

from bbct.kernels.formats import (
    EXP_ZERO,
    Rounding,
    Saturation,
    bit_length_ref,
    extent,
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
def _plus_bias(s, tab, force, r, j, lo, hi, wrap, bits):
    """``sat_acc(acc + bias')`` with the aligned bias from row ``r`` of the table; (acc, event).
    ``force`` marks stand-ins for aligned biases beyond the datapath (module docstring, step 4)."""
    v = s + tab[r, j]
    y = saturate(v, lo, hi, wrap, bits)
    return y, y != v or force[r, j]


@nb.njit(cache=True)
def _gemm_seq(a, b, rid, tab, force, use_bias, lo, hi, wrap, bits, out):
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
                    s, ov = _plus_bias(s, tab, force, r, j, lo, hi, wrap, bits)
                    c += ov
                out[t, i, j] = s
                n_over += c
    return n_over


@nb.njit(cache=True)
def _gemm_seq_at(a, b, idx, rid, tab, force, use_bias, lo, hi, wrap, bits, out):
    """The sequential loop (and bias) on the listed outputs only (rows of ``idx``: t, i, j)."""
    m_ = a.shape[1]
    n_over = 0
    for q in range(idx.shape[0]):
        t, i, j = idx[q, 0], idx[q, 1], idx[q, 2]
        tb = t if b.shape[0] > 1 else 0
        s, c = _mac(a, b, t, tb, i, j, lo, hi, wrap, bits)
        if use_bias:
            s, ov = _plus_bias(s, tab, force, rid[t * m_ + i], j, lo, hi, wrap, bits)
            c += ov
        out[t, i, j] = s
        n_over += c
    return n_over


@nb.njit(cache=True)
def _finish(accf, rid, tab, force, use_bias, rmax, rsum, cmax, csum, hi, lo, wrap, bits, out, skip):
    """Exact float sums (module docstring, steps 1-2) -> int64, plus the aligned bias with
    narrowing, for products where some outputs may leave the range (otherwise
    :func:`_finish_rows`). An output whose prefix-sum bound (step 2) exceeds ``hi`` is marked
    in ``skip`` and left for :func:`_gemm_seq_at`; returns (events, marked outputs). The bound factors
    are int64 row/column statistics of ``|a|`` and ``|b|`` whose products are <= P < 2**53."""
    bt, m_, n_ = accf.shape
    n_over = 0
    n_skip = 0
    for t in range(bt):
        tb = t if csum.shape[0] > 1 else 0
        for i in range(m_):
            r = rid[t * m_ + i]
            for j in range(n_):
                p1 = rmax[t, i] * csum[tb, j]
                p2 = rsum[t, i] * cmax[tb, j]
                if (p1 if p1 < p2 else p2) > hi:
                    skip[t, i, j] = True
                    n_skip += 1
                    continue
                s = np.int64(accf[t, i, j])  # an integer below 2**53: exact conversion
                if use_bias:
                    s, ov = _plus_bias(s, tab, force, r, j, lo, hi, wrap, bits)
                    n_over += ov
                out[t, i, j] = s
    return n_over, n_skip


@nb.njit(cache=True)
def _finish_rows(accf, rid, tab, force, use_bias, lo, hi, wrap, bits, out):
    """:func:`_finish` when no output needs the sequential loop (the bound of step 2 holds for
    all), on (rows, N) views: a branch-free inner loop per row that vectorizes. Without a bias
    nothing narrows (every exact sum is in range); with one, SAT/SAT_SYM clip by min/max and
    WRAP goes through :func:`saturate`. Returns the events, as :func:`_finish` counts them."""
    rows, n_ = accf.shape
    n_over = 0
    for i in range(rows):
        if not use_bias:
            for j in range(n_):
                out[i, j] = np.int64(accf[i, j])  # an integer below 2**53: exact conversion
            continue
        r = rid[i]
        c = 0
        if wrap:
            for j in range(n_):
                v = np.int64(accf[i, j]) + tab[r, j]
                y = saturate(v, lo, hi, wrap, bits)
                c += (y != v) | force[r, j]
                out[i, j] = y
        else:
            for j in range(n_):
                v = np.int64(accf[i, j]) + tab[r, j]
                y = min(max(v, lo), hi)
                c += (y != v) | force[r, j]
                out[i, j] = y
        n_over += c
    return n_over


@nb.njit(cache=True)
def _abs_stats(x, axis):
    """Per-row (``axis`` = 2: over k of (T, M, K)) or per-column (``axis`` = 1: over k of
    (T, K, N)) max and sum of ``|x|``, as int64 (|x| < 2**62 and the sums are <= P < 2**53
    whenever they are used)."""
    t_, d1, d2 = x.shape
    n_ = d1 if axis == 2 else d2
    mx = np.zeros((t_, n_), np.int64)
    sm = np.zeros((t_, n_), np.int64)
    for t in range(t_):
        for p in range(d1):
            for q in range(d2):
                v = x[t, p, q]
                if v < 0:
                    v = -v
                o = p if axis == 2 else q
                if v > mx[t, o]:
                    mx[t, o] = v
                sm[t, o] += v
    return mx, sm


_DATAPATH = 1 << 62  # |operand|, |bias|, |aligned bias| below this: exact int64 arithmetic
_I32 = (-(1 << 31), (1 << 31) - 1)


def _where(name: str, x: np.ndarray, bad: np.ndarray) -> str:
    """``name[i, j] = value`` of the first flagged element (``name = value`` for a scalar)."""
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    at = f"[{', '.join(map(str, idx))}]" if idx else ""
    return f"{name}{at} = {int(x[idx])}"


def _operand(name: str, x: object) -> tuple[np.ndarray, int]:
    """``x`` as int64 and its ``max |x|``, refusing ``|x| >= 2**62`` before the cast (which
    wraps an uint64 above the int64 maximum and gives ``np.abs(int64 min) < 0``, so no later
    bound would see it)."""
    x = require_int(f"gemm: {name}", x)
    if not x.size:
        return x.astype(np.int64, copy=False), 0
    hi, lo = (int(v) for v in extent(np.ascontiguousarray(x).reshape(-1)))
    if hi >= _DATAPATH or lo <= -_DATAPATH:
        bad = x >= _DATAPATH if x.dtype.kind == "u" else (x >= _DATAPATH) | (x <= -_DATAPATH)
        raise ValueError(
            f"gemm: {_where(name, x, bad)} is outside |x| < 2**62, the int64 datapath the kernel is exact on"
        )
    return x.astype(np.int64, copy=False), max(hi, -lo)


def _exponent(name: str, e: object) -> np.ndarray:
    """``e`` as int64, refusing values outside int32 (exponents are int32: no silent cast)."""
    e = require_int(f"gemm: {name}", e)
    info = np.iinfo(e.dtype)
    if e.size and (info.max > _I32[1] or info.min < _I32[0]):
        if int(e.max()) > _I32[1] or int(e.min()) < _I32[0]:
            bad = e > _I32[1] if e.dtype.kind == "u" else (e > _I32[1]) | (e < _I32[0])
            raise ValueError(f"gemm: {_where(name, e, bad)} is outside int32 (exponents are int32)")
    return e.astype(np.int64)


def _zero_rows(a, ea, b, eb, rows):
    """Rows whose products are all zero by their exponent (``<= EXP_ZERO``: an all-zero row of
    ``a`` or an all-zero ``b``), a bool array of shape ``rows`` (batch + (M, 1)). The data
    behind such an exponent must be zero (checked)."""
    za, zb = ea <= EXP_ZERO, eb <= EXP_ZERO
    if za.any() and (bad := za & np.any(a != 0, axis=-1, keepdims=True)).any():
        raise ValueError(
            f"gemm: {_where('ea', np.broadcast_to(ea, bad.shape), bad)} marks an all-zero row "
            "(<= EXP_ZERO) but that row of a is not zero"
        )
    if zb.any() and (bad := zb & np.any(b != 0, axis=(-2, -1), keepdims=True)).any():
        where = f"eb = {int(eb)}" if eb.ndim == 0 else _where("eb", np.broadcast_to(eb, bad.shape), bad)
        raise ValueError(f"gemm: {where} marks an all-zero b (<= EXP_ZERO) but b is not zero")
    return np.broadcast_to(za, rows) | np.broadcast_to(zb, rows[:-2] + (1, 1))


def _aligned_bias(bias, sh, rounding, acc_bits, acc_saturation):
    """``bias >>r sh`` per column, and the stand-in flags (module docstring, step 4)."""
    if sh >= 0:
        return shift_round_array(bias, sh, rounding), np.zeros(bias.shape, np.bool_)
    left = -sh  # 1..62 (checked)
    big = np.abs(bias) >= 1 << (62 - left)  # exactly where |bias << left| >= 2**62
    vals = np.where(big, 0, bias) << left
    for j in np.flatnonzero(big):
        v = int(bias[j]) << left  # exact (Python int)
        if acc_saturation == Saturation.WRAP:
            vals[j] = saturate_ref(v, acc_bits, True, acc_saturation)[0]  # the same low acc_bits bits
        else:
            vals[j] = _DATAPATH if v > 0 else -_DATAPATH  # beyond the range on the same side
    return vals, big


def _bias_table(bias, e_acc, e_bias, rounding, rows, acc_bits, acc_saturation):
    """Aligned bias rows: one per distinct shift ``e_acc - e_bias`` (clamped to 62), the table
    row of every accumulator row, and the stand-in flags. Same values as shifting per element."""
    if bias is None:
        return np.zeros((rows,), np.int64), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.bool_)
    sh = np.minimum(e_acc.reshape(-1).astype(np.int64) - int(e_bias), 62)
    uniq, rid = np.unique(sh, return_inverse=True)
    if not len(uniq):
        return np.zeros((rows,), np.int64), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.bool_)
    parts = [_aligned_bias(bias, int(u), rounding, acc_bits, acc_saturation) for u in uniq]
    tab = np.stack([p[0] for p in parts]).astype(np.int64)
    force = np.stack([p[1] for p in parts])
    return np.ascontiguousarray(rid.astype(np.int64)), np.ascontiguousarray(tab), np.ascontiguousarray(force)


def _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias):
    """Validate the contract's inputs; returns int64 operands, the bias, the batch shape, the
    int32 accumulator exponents (zero rows resolved) and the float-exactness bound P."""
    a, amax = _operand("a", a)
    b, bmax = _operand("b", b)
    ea = _exponent("ea", ea)
    eb = _exponent("eb", eb)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: shapes {a.shape} and {b.shape} do not multiply")
    if not isinstance(acc_bits, (int, np.integer)) or not 2 <= int(acc_bits) <= 62:
        raise ValueError(f"gemm: acc_bits={acc_bits!r} must be an integer in 2..62")
    acc_bits = int(acc_bits)
    Saturation(int(acc_saturation))
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        rows = batch + (a.shape[-2], 1)
        e_acc = np.broadcast_to(ea, rows) + np.broadcast_to(eb, batch + (1, 1))
    except ValueError:
        raise ValueError(
            f"gemm: a {a.shape} (ea {ea.shape}) and b {b.shape} (eb {eb.shape}) do not broadcast"
        ) from None
    if e_acc.size and (e_acc.max() > _I32[1] or e_acc.min() < _I32[0]):
        bad = (e_acc > _I32[1]) | (e_acc < _I32[0])
        raise ValueError(f"gemm: {_where('(ea + eb)', e_acc, bad)} is outside int32 (exponents are int32)")
    zero = _zero_rows(a, ea, b, eb, rows)
    k = a.shape[-1]
    if amax * bmax >= 1 << 62:
        raise ValueError(f"gemm: max|a|*max|b| = {amax * bmax} must stay below 2**62 (int64 products)")
    if bias is not None:
        bias, bmx = _operand("bias", bias)
        if bias.shape != (b.shape[-1],):
            raise ValueError(f"gemm: bias shape {bias.shape}, expected ({b.shape[-1]},)")
        eb_ = _exponent("e_bias", e_bias)
        if eb_.ndim:
            raise ValueError(f"gemm: e_bias must be one integer, got shape {eb_.shape}")
        e_bias = int(eb_)
        if zero.any():  # the bias alone: at its own exponent, raised until it fits (docstring)
            e_zero = e_bias + max(0, bit_length_ref(bmx) - (acc_bits - 1))
            if e_zero > _I32[1]:
                raise ValueError(f"gemm: e_bias = {e_bias}: a zero row's exponent {e_zero} is outside int32")
            e_acc = np.where(zero, e_zero, e_acc)
        left = e_bias - int(e_acc.min()) if e_acc.size else 0
        if bmx and left > 62:
            raise ValueError(
                f"gemm: bias (max |bias| {bmx}) shifted left by {left} to the accumulator exponent "
                f"{int(e_acc.min())} needs more than 61 bits, beyond the bias shifter's 62 steps; lower e_bias"
            )
    return a, b, bias, e_bias, batch, e_acc.astype(np.int32), amax * bmax * max(k, 1)


_BLAS = ThreadpoolController()
# Below this many multiply-adds a product runs on one BLAS thread: waking the other threads
# costs more than they save, and far more when other processes keep the cores busy
# (64 x 384 x 384 took 60 ms on two threads of a loaded machine, under 1 ms on one).
_BLAS_THREADED_MACS = 1 << 28
# A stacked product (attention) spreads its items over as many threads as BLAS may use, each
# item on one BLAS thread, from this many multiply-adds per item on (seq 256 x head 32 x 256):
# below it, starting the threads costs what they save. Items on threads of their own, not each
# item on all BLAS threads: per-item BLAS thread wake-ups collapse when other processes keep
# the cores busy (seq 512 under a load of 5 on 2 cores: 16-19 s against 4.5 s single-threaded).
_BLAS_THREADED_ITEM_MACS = 1 << 21


def _blas_threads() -> int:
    return max((int(i.get("num_threads") or 1) for i in _BLAS.select(user_api="blas").info()), default=1)


def _stacked_matmul(a: np.ndarray, b: np.ndarray, ft: type) -> np.ndarray:
    """``a @ b`` of stacked operands (batch axes on both sides) in ``ft``; with items of
    ``_BLAS_THREADED_ITEM_MACS`` or more, the items are split over the BLAS thread count's
    worth of threads, each running one-thread BLAS (numpy releases the GIL in matmul)."""
    m_, k_, n_ = a.shape[-2], a.shape[-1], b.shape[-1]
    nthr = _blas_threads() if m_ * k_ * n_ >= _BLAS_THREADED_ITEM_MACS else 1
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    items = int(np.prod(batch, dtype=np.int64))
    with _BLAS.limit(limits=1, user_api="blas"):
        if nthr < 2 or items < 2:
            return np.matmul(a.astype(ft), b.astype(ft))
        from concurrent.futures import ThreadPoolExecutor

        a3 = np.broadcast_to(a.astype(ft), batch + (m_, k_)).reshape(items, m_, k_)
        b3 = np.broadcast_to(b.astype(ft), batch + (k_, n_)).reshape(items, k_, n_)
        out = np.empty((items, m_, n_), ft)
        cuts = np.linspace(0, items, min(nthr, items) + 1).astype(np.int64)

        def part(lo: int, hi: int) -> None:
            np.matmul(a3[lo:hi], b3[lo:hi], out=out[lo:hi])

        with ThreadPoolExecutor(len(cuts) - 1) as ex:  # a pool per call: safe across fork
            for f in [ex.submit(part, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]:
                f.result()
        return out.reshape(batch + (m_, n_))


def _float_matmul(a: np.ndarray, b: np.ndarray, ft: type, out_shape: tuple[int, ...]) -> np.ndarray:
    """``a @ b`` in float type ``ft`` (exact by step 1), broadcast to ``out_shape``.

    A 2-D ``b`` (a linear layer's weights) multiplies all rows of ``a`` in one 2-D BLAS call:
    numpy's stacked matmul issues one small call per batch item, each spinning up the BLAS
    threads, which collapses when another process shares the cores. Products with batch axes
    on both sides (attention) are many small matrices on one BLAS thread each; from
    ``_BLAS_THREADED_ITEM_MACS`` per item on (long sequences) the items are spread over threads
    (:func:`_stacked_matmul`). 2-D products below ``_BLAS_THREADED_MACS`` run on one thread."""
    k_, n_ = b.shape[-2], b.shape[-1]
    if b.ndim == 2:
        a2 = a.reshape(-1, k_).astype(ft)
        if a2.shape[0] * k_ * n_ >= _BLAS_THREADED_MACS:
            accf = a2 @ b.astype(ft)
        else:
            with _BLAS.limit(limits=1, user_api="blas"):
                accf = a2 @ b.astype(ft)
        accf = accf.reshape(a.shape[:-1] + (n_,))
    else:
        accf = _stacked_matmul(a, b, ft)
    if accf.shape != out_shape:  # b carried batch axes that a did not
        accf = np.broadcast_to(accf, out_shape)
    return accf


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
        int32 exponents ``(..., M, 1)`` (``ea + eb``; with a bias, an all-zero row at
        ``EXP_ZERO`` takes the bias's exponent ``e_bias + max(0, bitlen(max|bias|) -
        (acc_bits - 1))``), and the number of narrowings that changed a value.
        Bit-identical to :func:`gemm_ref`.

    Raises:
        ValueError: an operand or bias value with ``|x| >= 2**62``, an exponent (or
            ``ea + eb``) outside int32, nonzero data at an ``EXP_ZERO`` exponent, a bias
            shifted left by more than 62 steps; shapes that do not multiply.
    """
    a, b, bias, e_bias, batch, e_acc, bound = _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias)
    m_, k_, n_ = a.shape[-2], a.shape[-1], b.shape[-1]
    lo, hi, wrap = sat_bounds(acc_bits, True, acc_saturation)
    out_shape = batch + (m_, n_)
    nbt = int(np.prod(batch, dtype=np.int64))  # explicit: -1 cannot be inferred for empty operands
    a3 = np.broadcast_to(a, batch + (m_, k_)).reshape(nbt, m_, k_)
    b3 = b.reshape(1, k_, n_) if b.ndim == 2 else np.broadcast_to(b, batch + (k_, n_)).reshape(nbt, k_, n_)
    n_over = 0
    rid, tab, force = _bias_table(bias, e_acc, e_bias, bias_rounding, a3.shape[0] * m_, acc_bits, acc_saturation)
    use_bias = bias is not None
    shape3 = (a3.shape[0], m_, n_)
    if bound < EXACT_F64 and a3.size and b3.size:  # empty operands: the loop gives 0 (+ bias)
        ft = np.float32 if bound < EXACT_F32 else np.float64  # exact: module docstring, step 1
        accf = _float_matmul(a, b, ft, out_shape).reshape(-1, m_, n_)
        # float64 sums of their own become the int64 accumulators in place (the largest tensor
        # of a linear not held twice): each output is read before it is written, at its index
        own = accf.dtype == np.float64 and accf.flags.c_contiguous and accf.flags.writeable
        acc = accf.view(np.int64) if own else np.empty(shape3, np.int64)
        a3c, b3c = np.ascontiguousarray(a3), np.ascontiguousarray(b3)
        empty = np.zeros((0, 0), np.int64)
        rmax = rsum = cmax = csum = empty
        if bound > hi:  # step 2: find the outputs whose prefix sums might leave the range
            rmax, rsum = _abs_stats(a3c, 2)
            cmax, csum = _abs_stats(b3c, 1)
            # one global test first: the bound of every output is at most either product
            if min(int(rmax.max()) * int(csum.max()), int(rsum.max()) * int(cmax.max())) <= hi:
                rmax = rsum = cmax = csum = empty
        n_skip = 0
        if rmax.size:
            skip = np.zeros(acc.shape, np.bool_)
            ov, n_skip = _finish(
                accf, rid, tab, force, use_bias, rmax, rsum, cmax, csum, hi, lo, wrap, acc_bits, acc, skip
            )
        else:
            a2 = np.ascontiguousarray(accf).reshape(-1, n_)
            ov = _finish_rows(a2, rid, tab, force, use_bias, lo, hi, wrap, acc_bits, acc.reshape(-1, n_))
        n_over += ov
        if n_skip:
            idx = np.argwhere(skip).astype(np.int64)
            n_over += _gemm_seq_at(a3c, b3c, idx, rid, tab, force, use_bias, lo, hi, wrap, acc_bits, acc)
    else:
        a3c, b3c = np.ascontiguousarray(a3), np.ascontiguousarray(b3)
        acc = np.empty(shape3, np.int64)
        n_over += _gemm_seq(a3c, b3c, rid, tab, force, use_bias, lo, hi, wrap, acc_bits, acc)
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
    a, b, bias, e_bias, batch, e_acc, _ = _check(a, ea, b, eb, acc_bits, acc_saturation, bias, e_bias)
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
