"""Calibration of static activation exponents from the float golden.

The golden (onnxruntime, every intermediate exposed) runs on calibration sentences; for each
activation point of the integer graph we keep the per-channel max |x| over the real (not
padding) tokens. Lowering turns those into per-block exponents, so block size and width can
change without calibrating again. Points the ONNX graph does not name are derived from named
ones (a residual sum is the sum of its two named operands) or from the embedding tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from bbct.simulator import spec as S
from bbct.simulator.lower import Calibration, linear_names


def _channel_amax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Max |x| per last-axis channel over the tokens where mask (B, S) is 1."""
    x = np.asarray(x, np.float64)
    x = x.reshape(mask.shape + (-1,)) if x.ndim != 3 else x
    valid = mask.astype(bool)
    if not valid.any():
        return np.zeros(x.shape[-1])
    return np.max(np.abs(x[valid]), axis=0)


def float_points(
    spec: S.BertSpec, inputs: dict[str, np.ndarray], golden: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Float value at every activation point the lowering may calibrate, by point name."""
    e = spec.embeddings
    ids = np.asarray(inputs["input_ids"])
    b, s = ids.shape
    pos = np.arange(e.position_offset, e.position_offset + s)
    out: dict[str, np.ndarray] = {}
    wp = e.word[ids].astype(np.float64) + e.position[pos][None].astype(np.float64)
    out["emb.sum_wp"] = wp
    if e.token_type is not None:
        tt = np.asarray(inputs.get("token_type_ids", np.zeros_like(ids)))
        out["emb.sum"] = wp + e.token_type[tt]

    def named(point: str, name: str | None) -> np.ndarray | None:
        if name and name in golden:
            out[point] = np.asarray(golden[name], np.float64).reshape(b, s, -1)
            return out[point]
        return None

    x = named("emb.ln", e.layer_norm.names.get(S.ROLE_OUT))
    for i, layer in enumerate(spec.layers):
        p = f"L{i}."
        at = layer.attention
        for role, lin in (("q", at.q), ("k", at.k), ("v", at.v)):
            named(p + role, lin.names.get(S.ROLE_OUT))
        named(p + "context", at.names.get(S.ROLE_CONTEXT))
        a = named(p + "attn_out", at.out.names.get(S.ROLE_OUT))
        if x is not None and a is not None:
            out[p + "res1"] = x + a
        h = named(p + "ln1", layer.attention_norm.names.get(S.ROLE_OUT))
        named(p + "ffn1", layer.intermediate.names.get(S.ROLE_OUT))
        named(p + "gelu", layer.names.get(S.ROLE_OUT))
        f = named(p + "ffn2", layer.output.names.get(S.ROLE_OUT))
        if h is not None and f is not None:
            out[p + "res2"] = h + f
        x = named(p + "ln2", layer.output_norm.names.get(S.ROLE_OUT))
    return out


def calibrate(
    spec: S.BertSpec,
    batches: Iterable[dict[str, np.ndarray]],
    golden_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> Calibration:
    """Run ``golden_fn`` (inputs -> every golden tensor by name) over ``batches``; keep maxima."""
    calib = Calibration()
    for inputs in batches:
        golden = golden_fn(inputs)
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(inputs["input_ids"])))
        for point, x in float_points(spec, inputs, golden).items():
            a = _channel_amax(x, mask)
            prev = calib.amax.get(point)
            calib.amax[point] = a if prev is None else np.maximum(prev, a)
        calib.sentences += int(mask.shape[0])
    return calib


def collect_hessians(spec: S.BertSpec, batches: Iterable[dict[str, np.ndarray]], calib: Calibration) -> Calibration:
    """Add ``sum x x^T`` of every linear's float input over the real (not padding) tokens of
    ``batches`` to ``calib.hessians`` (the float model of :mod:`bbct.simulator.float_model`)."""
    from bbct.simulator.float_model import run_spec_float

    names = linear_names(spec)
    for inputs in batches:
        mask = np.asarray(inputs.get("attention_mask", np.ones_like(inputs["input_ids"]))).astype(bool)

        def tap(lin: S.Linear, x: np.ndarray, mask: np.ndarray = mask) -> None:
            name = names.get(id(lin))
            if name is None:
                return
            x = np.asarray(x, np.float64)
            rows = x[mask] if x.ndim == 3 else x.reshape(-1, x.shape[-1])  # (B, S, K) or CLS rows
            h = rows.T @ rows
            calib.hessians[name] = h if name not in calib.hessians else calib.hessians[name] + h

        run_spec_float(
            spec, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("token_type_ids"), on_linear=tap
        )
    return calib
