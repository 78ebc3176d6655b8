"""Layer-by-layer comparison of the integer simulation with the float golden, by tensor name."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bbct.golden.errors import BbctError
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
        pending = 0
        for n in self.graph.nodes:
            pending += result.overflow.get(n.name, 0)
            if not n.onnx_name or n.onnx_name not in golden or n.name not in result.tensors:
                continue
            q = result.tensors[n.name]
            g = np.asarray(golden[n.onnx_name], np.float64)
            if q.shape != g.shape and q.data.size != g.size:
                continue
            bad = ~np.isfinite(g)
            if bad.any():
                idx = tuple(int(i) for i in np.argwhere(bad)[0])
                raise BbctError(
                    f"the float golden tensor {n.onnx_name!r} holds {g[idx]} at {list(idx)}: "
                    "the float model itself overflows, so no comparison is meaningful"
                )
            shape = tuple(g.shape)
            sel = real_tokens(g, mask)
            if sel is not None and q.shape == g.shape:
                # real tokens first, then dequantize: the same float64 per element (codes times
                # their block's scale), without the padding that is most of a short sentence's row
                g, x = g[sel], q.data[sel].astype(np.float64) * q.scale_array()[sel]
            else:
                x = q.dequantize().reshape(g.shape)
                if sel is not None:
                    g, x = g[sel], x[sel]
            g, x = g.ravel(), x.ravel()
            st = self.stats.setdefault(n.name, [shape, q.fmt.short(), 0.0, 0.0, 0.0, 0.0, 0.0, 0])
            e = g - x
            st[2] += float(np.sum(g * g))
            st[3] += float(np.sum(e * e))
            st[4] += float(np.sum(g * x))
            st[5] += float(np.sum(x * x))
            st[6] = max(st[6], float(np.max(np.abs(e))) if e.size else 0.0)
            st[7] += pending
            pending = 0

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
