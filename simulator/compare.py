"""Layer-by-layer comparison of the integer simulation with the float golden, by tensor name."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba as nb
import numpy as np

from bbct.golden.errors import BbctError
from bbct.kernels.formats import QTensor, block_index
from bbct.simulator import ir
from bbct.simulator.execute import Result


@dataclass(frozen=True)
class Row:
    """One IR tensor compared with the golden tensor of the same ONNX name."""

    node: str
    onnx_name: str
    shape: tuple[int, ...]
    fmt: str
    sqnr_db: float  # 10 log10(sum g^2 / sum (g - q)^2); inf when equal
    cosine: float
    max_abs_err: float
    overflow: int  # overflow/saturation events in the nodes since the previous compared row

    def to_dict(self) -> dict:
        """Strict-JSON record: an exact tensor's SQNR (infinite) is null with ``exact`` true."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["exact"] = self.sqnr_db == float("inf")
        if not np.isfinite(self.sqnr_db):
            d["sqnr_db"] = None
        return d


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    err = np.sum((ref - np.asarray(test, np.float64)) ** 2)
    return _sqnr(float(np.sum(ref**2)), float(err))


def _sqnr(sig: float, err: float) -> float:
    if err == 0:
        return float("inf")
    if sig == 0:
        return float("-inf")
    return float(10.0 * np.log10(sig / err))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    # element-wise products summed by numpy's pairwise sum, never a BLAS dot: the result must
    # not depend on the number of BLAS threads
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return _cos(float(np.sum(a * b)), float(np.sum(a * a)), float(np.sum(b * b)))


def _cos(ab: float, aa: float, bb: float) -> float:
    if aa == 0 or bb == 0:
        return 1.0 if aa == bb else 0.0
    return float(ab / (np.sqrt(aa) * np.sqrt(bb)))


def real_tokens(g: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Boolean selector of ``g``'s elements that belong to real tokens: rows (B, S, ...) where
    the attention mask is 1; for (B, heads, S, S) attention tensors, real query rows and real
    key columns. None when ``g`` has no sequence axis to select on."""
    if mask is None:
        return None
    m = np.asarray(mask).astype(bool)
    if g.ndim >= 2 and g.shape[:2] == m.shape:
        return np.broadcast_to(m.reshape(m.shape + (1,) * (g.ndim - 2)), g.shape)
    if g.ndim == 4 and g.shape[0] == m.shape[0] and g.shape[2] == m.shape[1]:
        rows = m[:, None, :, None]
        cols = m[:, None, None, :] if g.shape[3] == m.shape[1] else True
        return np.broadcast_to(rows & cols, g.shape)
    return None


@nb.njit(cache=True, inline="always")
def _combine8(r, k):
    return ((r[k, 0] + r[k, 1]) + (r[k, 2] + r[k, 3])) + ((r[k, 4] + r[k, 5]) + (r[k, 6] + r[k, 7]))


@nb.njit(cache=True)
def _leaf(g, x, lo, n, r):
    """One leaf block (n <= 128) of numpy's pairwise sum, for g*g, e*e, g*x and x*x at once
    (e = g - x): eight strided partial sums (in the scratch ``r``, (4, 8)) combined as numpy
    combines them, then the tail."""
    if n < 8:
        a = b = c = d = 0.0
        for i in range(lo, lo + n):
            gi, xi = g[i], x[i]
            ei = gi - xi
            a += gi * gi
            b += ei * ei
            c += gi * xi
            d += xi * xi
        return a, b, c, d
    for j in range(8):
        gi, xi = g[lo + j], x[lo + j]
        ei = gi - xi
        r[0, j], r[1, j], r[2, j], r[3, j] = gi * gi, ei * ei, gi * xi, xi * xi
    m = n - n % 8
    i = 8
    while i < m:
        for j in range(8):
            gi, xi = g[lo + i + j], x[lo + i + j]
            ei = gi - xi
            r[0, j] += gi * gi
            r[1, j] += ei * ei
            r[2, j] += gi * xi
            r[3, j] += xi * xi
        i += 8
    a, b, c, d = _combine8(r, 0), _combine8(r, 1), _combine8(r, 2), _combine8(r, 3)
    while i < n:
        gi, xi = g[lo + i], x[lo + i]
        ei = gi - xi
        a += gi * gi
        b += ei * ei
        c += gi * xi
        d += xi * xi
        i += 1
    return a, b, c, d


@nb.njit(cache=True)
def _pairwise4(g, x, n):
    """numpy's pairwise recursion (halves split at a multiple of 8 until at most 128 values)
    as a loop over an explicit stack: Numba's cache does not keep recursive functions."""
    lo_s = np.empty(128, np.int64)  # pending ranges: start, length, 0 = to split, 1 = to join
    n_s = np.empty(128, np.int64)
    st_s = np.empty(128, np.int64)
    val = np.empty((128, 4))  # partial sums of the ranges done, in the order they finished
    r = np.empty((4, 8))  # a leaf's strided partial sums
    top = 0
    nv = 0
    lo_s[0], n_s[0], st_s[0] = 0, n, 0
    top = 1
    while top:
        top -= 1
        lo, m, st = lo_s[top], n_s[top], st_s[top]
        if st == 1:  # both halves done: left below right
            nv -= 1
            for k in range(4):
                val[nv - 1, k] = val[nv - 1, k] + val[nv, k]
        elif m <= 128:
            a, b, c, d = _leaf(g, x, lo, m, r)
            val[nv, 0], val[nv, 1], val[nv, 2], val[nv, 3] = a, b, c, d
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            lo_s[top], n_s[top], st_s[top] = lo, m, 1
            lo_s[top + 1], n_s[top + 1], st_s[top + 1] = lo + m2, m - m2, 0
            lo_s[top + 2], n_s[top + 2], st_s[top + 2] = lo, m2, 0
            top += 3
    return val[0, 0], val[0, 1], val[0, 2], val[0, 3]


@nb.njit(cache=True)
def _error_sums(g, x):
    mx = 0.0
    for i in range(g.size):
        v = abs(g[i] - x[i])
        if v > mx:
            mx = v
    a, b, c, d = _pairwise4(g, x, g.size)
    return a, b, c, d, mx


def _real_rows(shape: tuple[int, ...], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
    """:func:`real_tokens` as rows of the last axis: which of the ``prod(shape[:-1])`` rows are
    real, and whether within a real row only the real key columns count (``mask[row //
    per_b]``); None where :func:`real_tokens` selects nothing. The fast gather's twin of
    :func:`real_tokens`, the plain selector that tests hold it equal to."""
    m = np.asarray(mask).astype(bool)
    B, S = m.shape
    if len(shape) == 2 and tuple(shape) == m.shape:  # one element per token
        return np.ones(B, bool), m, 1, True
    if len(shape) >= 3 and tuple(shape[:2]) == m.shape:
        rows = np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - 3)), shape[:-1])
        return np.ascontiguousarray(rows).ravel(), m, 1, False
    if len(shape) == 4 and shape[0] == B and shape[2] == S:
        rows = np.broadcast_to(m[:, None, :], shape[:-1])
        return np.ascontiguousarray(rows).ravel(), m, shape[1] * shape[2], shape[3] == S
    return None


@nb.njit(cache=True)
def _gather_rows(g, q, s, bs, rsel, cmask, per_b, cols):
    """The real elements of ``g`` (R, C) as float64 and of ``q * s`` (codes times their
    block's scale, ``s[r, c // bs]``), in C order: row ``r`` when ``rsel[r]``, and within it
    column ``c`` unless ``cols`` and not ``cmask[r // per_b, c]``."""
    R, C = g.shape
    n = 0
    for r in range(R):
        if rsel[r]:
            if cols:
                b = r // per_b
                for c in range(C):
                    n += cmask[b, c]
            else:
                n += C
    gs = np.empty(n)
    xs = np.empty(n)
    k = 0
    nb = s.shape[1]
    for r in range(R):
        if not rsel[r]:
            continue
        b = r // per_b
        for j in range(nb):  # a block at a time: one scale, no division per element
            sc = s[r, j]
            hi = min(C, (j + 1) * bs)
            if cols:
                for c in range(j * bs, hi):
                    if cmask[b, c]:
                        gs[k] = np.float64(g[r, c])
                        xs[k] = np.float64(q[r, c]) * sc
                        k += 1
            else:
                for c in range(j * bs, hi):
                    gs[k] = np.float64(g[r, c])
                    xs[k] = np.float64(q[r, c]) * sc
                    k += 1
    return gs, xs


def _real_pairs(q: QTensor, g: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``g[sel]`` and ``q.dequantize()[sel]`` for :func:`real_tokens`' ``sel``, the same float64
    values in the same order, gathered a row at a time with one scale per block (no per-element
    scale or selector array); None where the layout is not rows of the last axis."""
    shape = g.shape
    rows = _real_rows(shape, mask)
    if rows is None or q.shape != shape or not g.size:
        return None
    nd, axis = g.ndim, q.fmt.block_axis % g.ndim
    sb = np.ldexp(1.0, np.asarray(q.exp, np.int64))
    if q.mant is not None:
        sb = sb * q.mant
    if sb.ndim != nd:
        return None
    if axis != nd - 1 and sb.shape[axis] != 1:  # blocks across rows: one scale per row
        sb = np.take(sb, block_index(shape[axis], q.fmt.block_size), axis=axis)
    C, nbl = shape[-1], sb.shape[-1]
    bs = C if nbl == 1 else (q.fmt.block_size if axis == nd - 1 else 1)
    if bs < 1 or nbl * bs < C or (nbl - 1) * bs >= C:  # exponents that do not match the format's blocks
        return None
    s2 = np.ascontiguousarray(np.broadcast_to(sb, shape[:-1] + (nbl,))).reshape(-1, nbl)
    rsel, cmask, per_b, cols = rows
    g2 = np.ascontiguousarray(g).reshape(-1, C)
    q2 = np.ascontiguousarray(q.data).reshape(-1, C)
    return _gather_rows(g2, q2, s2, bs, rsel, cmask, per_b, cols)


def error_sums(g: np.ndarray, x: np.ndarray) -> tuple[float, float, float, float, float]:
    """``sum(g*g), sum(e*e), sum(g*x), sum(x*x), max|e|`` (e = g - x) of two float64 vectors,
    in one pass and without temporaries, bit for bit what ``np.sum`` gives on the products
    (its pairwise summation: blocks of at most 128 values summed in eight strided partial
    sums, halves split at multiples of 8), so a report does not change with this speed-up."""
    g = np.ascontiguousarray(g, np.float64).ravel()
    x = np.ascontiguousarray(x, np.float64).ravel()
    if g.shape != x.shape:
        raise ValueError(f"error_sums: {g.shape} vs {x.shape}")
    a, b, c, d, mx = _error_sums(g, x)
    return float(a), float(b), float(c), float(d), float(mx)


def compared_nodes(graph: ir.Graph, golden_names) -> list[str]:
    """Nodes of ``graph`` a comparison reads: those naming a golden tensor in ``golden_names``."""
    names = set(golden_names)
    return [n.name for n in graph.nodes if n.onnx_name and n.onnx_name in names]


def batch_stats(
    graph: ir.Graph,
    result: Result,
    golden: dict[str, np.ndarray],
    mask: np.ndarray | None = None,
    examples: np.ndarray | None = None,
) -> dict[str, list]:
    """One batch's error sums by node (``[shape, fmt, gg, ee, gq, qq, max_err, overflow]``):
    what :meth:`Comparison.merge` adds up, computed where the batch ran. With ``examples``
    (bool per batch row; the ``mask`` is then required) only those examples count: their
    real tokens, or their rows of a tensor without a sequence axis."""
    if examples is not None:
        examples = np.asarray(examples, bool)
        if mask is None:
            raise ValueError("batch_stats: examples need the attention mask (ones for a model without one)")
        mask = np.asarray(mask).astype(bool) & examples[:, None]
    out: dict[str, list] = {}
    pending = 0
    for n in graph.nodes:
        pending += result.overflow.get(n.name, 0)
        if not n.onnx_name or n.onnx_name not in golden or n.name not in result.tensors:
            continue
        q = result.tensors[n.name]
        g = np.asarray(golden[n.onnx_name])
        if q.shape != g.shape and q.data.size != g.size:
            continue
        shape = tuple(g.shape)
        pairs = None
        if mask is not None and g.dtype in (np.float32, np.float64) and np.isfinite(g).all():
            pairs = _real_pairs(q, g, mask)
        if pairs is not None:
            gg, ee, gq, qq, mx = error_sums(*pairs)
            out[n.name] = [shape, q.fmt.short(), gg, ee, gq, qq, mx, pending]
            pending = 0
            continue
        sel = real_tokens(g, mask)
        g = np.asarray(g, np.float64)
        bad = ~np.isfinite(g)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise BbctError(
                f"the float golden tensor {n.onnx_name!r} holds {g[idx]} at {list(idx)}: "
                "the float model itself overflows, so no comparison is meaningful"
            )
        if sel is not None and q.shape == g.shape:
            # real tokens first, then dequantize: the same float64 per element (codes times
            # their block's scale), without the padding that is most of a short sentence's row
            g, x = g[sel], q.data[sel].astype(np.float64) * q.scale_array()[sel]
        else:
            x = q.dequantize().reshape(g.shape)
            if sel is not None:
                g, x = g[sel], x[sel]
            elif examples is not None and g.ndim and g.shape[0] == len(examples):  # e.g. logits (B, labels)
                g, x = g[examples], x[examples]
        gg, ee, gq, qq, mx = error_sums(g, x)
        out[n.name] = [shape, q.fmt.short(), gg, ee, gq, qq, mx, pending]
        pending = 0
    return out


class Comparison:
    """Per-tensor error statistics accumulated over batches (sums of squares and products in
    float64, in batch order: the same inputs give the same report, whatever the batching of
    BLAS threads), so a long list of inputs is compared without holding every tensor at once."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.stats: dict[str, list] = {}  # node -> [shape, fmt, gg, ee, gq, qq, max_err, overflow]

    def add(self, result: Result, golden: dict[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        """Accumulate one batch: traced ``result`` against ``golden`` (tensor name -> array),
        over real tokens when the attention ``mask`` (B, S) is given."""
        self.merge(batch_stats(self.graph, result, golden, mask))

    def merge(self, part: dict[str, list]) -> None:
        """Add one batch's :func:`batch_stats` (batches merged in order give the same sums
        wherever each batch was computed)."""
        for name, p in part.items():
            st = self.stats.setdefault(name, [p[0], p[1], 0.0, 0.0, 0.0, 0.0, 0.0, 0])
            for k in range(2, 6):
                st[k] += p[k]
            st[6] = max(st[6], p[6])
            st[7] += p[7]

    def rows(self) -> list[Row]:
        out = []
        for n in self.graph.nodes:
            st = self.stats.get(n.name)
            if st is None:
                continue
            shape, fmt, gg, ee, gq, qq, mx, ovf = st
            out.append(
                Row(
                    node=n.name,
                    onnx_name=n.onnx_name or "",
                    shape=shape,
                    fmt=fmt,
                    sqnr_db=_sqnr(gg, ee),
                    cosine=_cos(gq, gg, qq),
                    max_abs_err=mx,
                    overflow=ovf,
                )
            )
        return out


def compare(
    graph: ir.Graph, result: Result, golden: dict[str, np.ndarray], mask: np.ndarray | None = None
) -> list[Row]:
    """Rows for every traced node that names a golden tensor present in ``golden``.

    With the attention ``mask`` (B, S), every measure is taken over real tokens only: padding
    positions compute values no output reads, and would drown the real error. A non-finite
    golden value is an error naming the tensor."""
    c = Comparison(graph)
    c.add(result, golden, mask)
    return c.rows()


def first_below(rows: list[Row], threshold_db: float) -> Row | None:
    """The first compared tensor whose SQNR falls below ``threshold_db``."""
    return next((r for r in rows if r.sqnr_db < threshold_db), None)


def format_table(rows: list[Row]) -> str:
    head = f"{'node':<22} {'format':<28} {'SQNR dB':>8} {'cosine':>9} {'max|err|':>10} {'ovf':>5}  onnx tensor"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.node:<22} {r.fmt:<28} {r.sqnr_db:>8.2f} {r.cosine:>9.6f} {r.max_abs_err:>10.4g} "
            f"{r.overflow:>5}  {r.onnx_name}"
        )
    return "\n".join(lines)
