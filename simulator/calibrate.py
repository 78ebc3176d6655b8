"""Calibration of static activation exponents and GPTQ statistics, from the float graph.

The float interpreter (:mod:`bbct.simulator.frontend.interp`, equal to onnxruntime on every
tensor) runs on calibration sentences; for each activation tensor we keep the per-channel
max |x| over the real (not padding) tokens, keyed by the float graph's tensor name. Lowering
turns those into per-block exponents, so block size and width can change without
calibrating again. The partial sums of an embedding sum are kept as ``<name>#partial<k>``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bbct.simulator.frontend import fgraph as F
from bbct.simulator.frontend.interp import run_float
from bbct.simulator.lower import Calibration


def _channel_amax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Max |x| per last-axis channel over the tokens where mask (B, S) is 1 (rows of a
    (B, H) tensor count when their sentence has a real token)."""
    x = np.asarray(x, np.float64)
    valid = mask.astype(bool)
    if x.ndim == 2:
        rows = x[valid.any(1)]
    else:
        x = x.reshape(mask.shape + (-1,)) if x.ndim != 3 else x
        rows = x[valid]
    if not rows.size:
        return np.zeros(x.shape[-1])
    return np.max(np.abs(rows), axis=0)


SKIP = (F.SplitHeads, F.Scores, F.Softmax, F.MatMul)  # per-head and score tensors are not calibrated


def _points(n: F.FNode, y: np.ndarray, args: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The activations of node ``n`` that the lowering may calibrate: its output, and an
    embedding sum's partial sums (``<name>#partial<k>``)."""
    if isinstance(n, SKIP):
        return {}
    out = {n.name: y}
    if isinstance(n, F.EmbeddingSum):
        x = n.tables[0][args[0]].astype(np.float64)
        for k, (t, i) in enumerate(zip(n.tables[1:], args[1:], strict=True), start=1):
            x = x + t[i]
            if k < len(n.tables) - 1:
                out[f"{n.name}#partial{k}"] = x
    return out


def calibrate(
    fg: F.FGraph, batches: Iterable[dict[str, np.ndarray]], gptq: bool = False, source: str = ""
) -> Calibration:
    """Per-channel maxima of every activation (and, with ``gptq``, each linear's input
    second moments ``sum x x^T`` over real tokens) over ``batches`` of encoded inputs.

    Statistics are taken as each tensor is computed, and the interpreter drops a tensor once
    nothing reads it, so memory holds a few tensors of a batch, not all of them.

    The float pass runs on one BLAS thread: its linears are stacked products, one small BLAS
    call per sentence, and waking a second thread for each collapses when another process
    keeps the cores busy (the w4a8 setup of ``bbct eval`` took 132 s on a loaded machine
    against 18 s on a quiet one). The thread count changes the last bits of the statistics
    (max |x| by about 1e-14), not the lowered RT classifier's codes or exponents (compared)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _calibrate(fg, batches, gptq, source)


def _calibrate(fg: F.FGraph, batches: Iterable[dict[str, np.ndarray]], gptq: bool, source: str) -> Calibration:
    calib = Calibration(source=source)
    for inputs in batches:
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(inputs["input_ids"])))
        valid = mask.astype(bool)

        def tap(lin: F.Linear, x: np.ndarray, valid: np.ndarray = valid) -> None:
            x = np.asarray(x, np.float64)
            rows = x[valid] if x.ndim == 3 else x.reshape(-1, x.shape[-1])  # (B, S, K) or pooled rows
            h = rows.T @ rows
            prev = calib.hessians.get(lin.name)
            calib.hessians[lin.name] = h if prev is None else prev + h

        def stats(n: F.FNode, y: np.ndarray, args: list[np.ndarray], mask: np.ndarray = mask) -> None:
            for point, x in _points(n, y, args).items():
                a = _channel_amax(x, mask)
                prev = calib.amax.get(point)
                calib.amax[point] = a if prev is None else np.maximum(prev, a)

        run_float(fg, inputs, on_linear=tap if gptq else None, on_node=stats, keep=False)
        calib.sentences += int(mask.shape[0])
    return calib
