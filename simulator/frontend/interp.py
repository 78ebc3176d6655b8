"""The float interpreter of a :class:`FGraph`: the float model bbct compares against.

It runs every typed node in float64 (float32 weights promoted) with the formulas ONNX and
PyTorch use, and the index subgraph for positions and masks; its tensors must equal
onnxruntime's of the same name to float tolerance (tested per family and exporter). It is
what calibration and GPTQ read: statistics key on the float graph's tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba as nb
import numpy as np

from bbct.simulator.errors import ExecutionError
from bbct.simulator.frontend import fgraph as F


@nb.vectorize(["float64(float64)"], cache=True)
def _erf(x: float) -> float:  # math.erf, element-wise at compiled speed
    return math.erf(x)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU in float64: ``"none"`` is x * Phi(x) (erf form); ``"tanh"`` the tanh approximation."""
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if approximate == "none":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * gamma + beta


def _softmax(n: F.Softmax, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    if n.mask_kind == "add":
        x = x + mask
    elif n.mask_kind == "where_true":
        x = np.where(mask, n.mask_value, x)
    elif n.mask_kind == "where_false":
        x = np.where(mask, x, n.mask_value)
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _split(n: F.SplitHeads, x: np.ndarray) -> np.ndarray:
    b, s, h = x.shape
    y = x.reshape(b, s, n.num_heads, h // n.num_heads)
    return y.transpose(0, 2, 3, 1) if n.transpose else y.transpose(0, 2, 1, 3)


def _merge(n: F.MergeHeads, x: np.ndarray) -> np.ndarray:
    b, nh, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, nh * d)


def _embedding_sum(n: F.EmbeddingSum, *ids: np.ndarray) -> np.ndarray:
    x = n.tables[0][ids[0]].astype(np.float64)
    for t, i in zip(n.tables[1:], ids[1:], strict=True):
        x = x + t[i]
    return x


def _linear(n: F.Linear, x: np.ndarray) -> np.ndarray:
    y = x @ n.weight.astype(x.dtype)
    if n.mid_given is not None:  # the product's given codes, then the bias
        y = n.mid_given.fake_quant(y)
    return y if n.bias is None else y + n.bias


def _quant_linear(n: F.QuantLinear, x: np.ndarray) -> np.ndarray:
    """The given input quantization, then the dequantized weight (== ``n.weight``)."""
    return _linear(n, n.x_quant.fake_quant(x))


def _mean_pool(n: F.MeanPool, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return (x * m[:, :, None]).sum(1) / np.maximum(m.sum(1), 1e-9)[:, None]


def _l2(n: F.L2Normalize, x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), n.eps)


EVAL: dict[type, Callable[..., np.ndarray]] = {
    F.Embedding: lambda n, i: n.table[i].astype(np.float64),
    F.EmbeddingSum: _embedding_sum,
    F.Linear: _linear,
    F.QuantLinear: _quant_linear,
    F.FakeQuant: lambda n, x: n.given.fake_quant(x),
    F.Add: lambda n, a, b: a + b,
    F.LayerNorm: lambda n, x: layer_norm(x, n.gamma, n.beta, n.eps),
    F.Gelu: lambda n, x: gelu(x, n.approximate),
    F.Tanh: lambda n, x: np.tanh(x),
    F.Relu: lambda n, x: np.maximum(x, 0.0),
    F.SplitHeads: _split,
    F.MergeHeads: _merge,
    F.Scores: lambda n, q, k: (q @ k) * n.scale,
    F.Softmax: _softmax,
    F.MatMul: lambda n, a, b: a @ b,
    F.TakeRow: lambda n, x: x[:, n.index],
    F.MeanPool: _mean_pool,
    F.L2Normalize: _l2,
}


def graph_feeds(fg: F.FGraph, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds by graph input name from feeds by role (``input_ids``, ...) or by name; a
    missing attention mask is all ones, missing token types zeros, positions 0..S-1."""
    ids = inputs.get("input_ids", inputs.get(fg.role_input("input_ids") or "input_ids"))
    if ids is None:
        raise ExecutionError("input 'input_ids' is required")
    ids = np.asarray(ids)
    out = {}
    for name, role in fg.inputs.items():
        v = inputs.get(name, inputs.get(role))
        if v is None:
            b, s = ids.shape
            v = {
                "attention_mask": np.ones((b, s), np.int64),
                "token_type_ids": np.zeros((b, s), np.int64),
                "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)),
                "input_ids": ids,
            }[role]
        out[name] = np.asarray(v)
    return out


def run_float(
    fg: F.FGraph,
    inputs: dict[str, np.ndarray],
    dtype: type = np.float64,
    on_linear: Callable[[F.Linear, np.ndarray], None] | None = None,
    on_node: Callable[[F.FNode, np.ndarray, list[np.ndarray]], None] | None = None,
    keep: bool = True,
) -> dict[str, np.ndarray]:
    """Every tensor of the float graph by name (index tensors included) for ``inputs``.

    ``on_linear(node, x)``, when given, sees every linear's input (GPTQ statistics);
    ``on_node(node, y, args)`` every node's output and inputs. With ``keep=False`` a tensor is
    dropped once no later node reads it (statistics taken by ``on_node`` need no more), and
    only the graph outputs are returned."""
    env: dict[str, np.ndarray] = graph_feeds(fg, inputs)
    env.update(fg.index.run(env))
    uses: dict[str, int] = {}
    for n in fg.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    outputs = set(fg.outputs)
    given = fg.info.get("given_activations") or {}
    for n in fg.nodes:
        args = [env[i] for i in n.inputs]
        if isinstance(n, F.Linear) and on_linear is not None:
            on_linear(n, args[0])
        y = EVAL[type(n)](n, *args)
        if n.name in given and not given[n.name][0].dynamic:  # the model's Q/DQ pair on this output
            y = given[n.name][0].fake_quant(y)
        env[n.name] = np.asarray(y, dtype) if np.asarray(y).dtype.kind == "f" else y
        if on_node is not None:
            on_node(n, env[n.name], args)
        if not keep:
            for i in n.inputs:
                uses[i] -= 1
                if uses[i] == 0 and i not in outputs:
                    env.pop(i, None)
    return env if keep else {o: env[o] for o in fg.outputs}
