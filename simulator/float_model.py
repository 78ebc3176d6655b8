"""A float64 NumPy BERT driven only by a :class:`BertSpec`: proof that import captured everything."""

from __future__ import annotations

import math

import numpy as np

from simulator import spec as S


def _ln(x: np.ndarray, ln: S.LayerNorm) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + ln.eps) * ln.gamma + ln.beta


def _lin(x: np.ndarray, lin: S.Linear) -> np.ndarray:
    y = x @ lin.weight.astype(np.float64)
    return y if lin.bias is None else y + lin.bias


def _gelu(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def run_spec_float(
    spec: S.BertSpec,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    token_type_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Outputs by role (last_hidden_state, pooler_output, logits) in float64."""
    ids = np.asarray(input_ids)
    b, s = ids.shape
    mask = np.ones((b, s)) if attention_mask is None else np.asarray(attention_mask, np.float64)
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    e = spec.embeddings
    x = e.word[ids].astype(np.float64) + e.position[np.arange(s) + e.position_offset][None]
    if e.token_type is not None:
        x = x + e.token_type[tt]
    x = _ln(x, e.layer_norm)
    for layer in spec.layers:
        at = layer.attention
        nh = at.num_heads
        d = x.shape[-1] // nh

        q, k, v = (_lin(x, lin).reshape(b, s, nh, d).transpose(0, 2, 1, 3) for lin in (at.q, at.k, at.v))
        sc = q @ k.transpose(0, 1, 3, 2) * at.scale + ((1 - mask) * max(at.mask_value, -1e30))[:, None, None, :]
        sc = sc - sc.max(-1, keepdims=True)
        p = np.exp(sc)
        p = p / p.sum(-1, keepdims=True)
        ctx = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        h = _ln(x + _lin(ctx, at.out), layer.attention_norm)
        x = _ln(h + _lin(_gelu(_lin(h, layer.intermediate), layer.activation), layer.output), layer.output_norm)
    out = {"last_hidden_state": x}
    if spec.pooler is not None:
        out["pooler_output"] = np.tanh(_lin(x[:, 0], spec.pooler))
        if spec.classifier is not None:
            out["logits"] = _lin(out["pooler_output"], spec.classifier)
    return out
