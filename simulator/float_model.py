"""A float NumPy BERT driven only by a :class:`BertSpec`: the proof that import captured everything.

No torch and no ONNX: weights, sizes, scale, mask value, eps and activation all come from
the spec. Besides the output roles, the result holds every tensor the spec names, under its
ONNX tensor name, so each can be compared with onnxruntime's value of the same name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba as nb
import numpy as np

from bbct.simulator import spec as S


@nb.vectorize(["float64(float64)"], cache=True)
def _erf(x: float) -> float:  # math.erf, element-wise at compiled speed
    return math.erf(x)


def gelu(x: np.ndarray, kind: str) -> np.ndarray:
    """GELU in float64: ``"gelu_erf"`` is x * Phi(x); ``"gelu_tanh"`` the tanh approximation."""
    x = np.asarray(x, np.float64)
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if kind == "gelu_erf":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    raise ValueError(f"activation must be 'gelu_erf' or 'gelu_tanh', got {kind!r}")


def layer_norm(x: np.ndarray, ln: S.LayerNorm) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + ln.eps) * ln.gamma + ln.beta


def linear(x: np.ndarray, lin: S.Linear) -> np.ndarray:
    y = x @ lin.weight.astype(x.dtype)
    return y if lin.bias is None else y + lin.bias


def run_spec_float(
    spec: S.BertSpec,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    token_type_ids: np.ndarray | None = None,
    dtype: type = np.float64,
    on_linear: Callable[[S.Linear, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run the spec in float (float64 by default).

    Returns the output roles (``last_hidden_state``, ``pooler_output``, ``logits``) and
    every named tensor of the spec by its ONNX name (Linear outputs after bias, LayerNorm
    outputs, the embedding sum, attention scores/probs/context in the ONNX layout
    ``(batch, heads, seq, seq)`` / ``(batch, seq, hidden)``, GELU outputs, pooler tanh).
    A padded key's score is ``score + mask_value`` as in the graph. ``on_linear(layer, x)``,
    when given, sees every Linear's input (calibration of GPTQ weights uses it).
    """
    ids = np.asarray(input_ids)
    b, s = ids.shape
    mask = np.ones((b, s)) if attention_mask is None else np.asarray(attention_mask)
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    out: dict[str, np.ndarray] = {}

    def keep(rec: object, role: str, v: np.ndarray) -> np.ndarray:
        name = rec.names.get(role)  # type: ignore[attr-defined]
        if name:
            out[name] = v
        return v

    def lin(x: np.ndarray, layer: S.Linear) -> np.ndarray:
        if on_linear is not None:
            on_linear(layer, x)
        return keep(layer, S.ROLE_OUT, linear(x, layer))

    def ln(x: np.ndarray, norm: S.LayerNorm) -> np.ndarray:
        return keep(norm, S.ROLE_OUT, layer_norm(x, norm))

    e = spec.embeddings
    x = e.word[ids].astype(dtype) + e.position[np.arange(s) + e.position_offset][None]
    if e.token_type is not None:
        x = x + e.token_type[tt if e.token_type.shape[0] > 1 else np.zeros_like(tt)]
    x = ln(keep(e, S.ROLE_OUT, x), e.layer_norm)
    add_mask = np.where(mask[:, None, None, :] > 0, 0.0, 1.0).astype(dtype)
    for layer in spec.layers:
        at = layer.attention
        nh = at.num_heads
        d = x.shape[-1] // nh
        q, k, v = (lin(x, p).reshape(b, s, nh, d).transpose(0, 2, 1, 3) for p in (at.q, at.k, at.v))
        sc = q @ k.transpose(0, 1, 3, 2) * at.scale + add_mask * at.mask_value
        keep(at, S.ROLE_SCORES, sc)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p = keep(at, S.ROLE_PROBS, p / p.sum(-1, keepdims=True))
        ctx = keep(at, S.ROLE_CONTEXT, (p @ v).transpose(0, 2, 1, 3).reshape(b, s, -1))
        h = ln(x + lin(ctx, at.out), layer.attention_norm)
        g = keep(layer, S.ROLE_OUT, gelu(lin(h, layer.intermediate), layer.activation).astype(dtype))
        x = ln(h + lin(g, layer.output), layer.output_norm)
    out["last_hidden_state"] = x
    if spec.pooler is not None:
        pooled = np.tanh(lin(x[:, 0], spec.pooler))
        out["pooler_output"] = pooled
        if spec.names.get("pooler_tanh"):
            out[spec.names["pooler_tanh"]] = pooled
        if spec.classifier is not None:
            out["logits"] = lin(pooled, spec.classifier)
    return out
