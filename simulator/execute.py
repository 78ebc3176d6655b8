"""Execute the integer IR with the kernels of :mod:`kernels` — integers only, end to end.

``run(graph, inputs)`` returns the output QTensors and, with ``trace=True``, every
intermediate QTensor by node name plus per-node overflow/saturation counts. The executor
checks that every value it hands from node to node is an integer array: a float between
nodes is a bug and raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bbct.kernels.add import add
from bbct.kernels.align import align
from bbct.kernels.embedding import embedding
from bbct.kernels.formats import IntFormat, QTensor, expand_blocks
from bbct.kernels.gelu import gelu_lut, gelu_poly
from bbct.kernels.gemm import gemm
from bbct.kernels.layernorm import layernorm
from bbct.kernels.requantize import requantize, requantize_mult
from bbct.kernels.softmax import softmax
from bbct.kernels.tanh import tanh_lut
from bbct.simulator import ir
from bbct.simulator.errors import ExecutionError


@dataclass
class Result:
    """Outputs by role, and (when traced) every tensor and the overflow counts by node."""

    outputs: dict[str, QTensor]
    tensors: dict[str, QTensor] = field(default_factory=dict)
    overflow: dict[str, int] = field(default_factory=dict)

    @property
    def overflow_count(self) -> int:
        return int(sum(self.overflow.values()))


def _wide(data: np.ndarray, exp: np.ndarray, bits: int = 62) -> QTensor:
    return QTensor(data, IntFormat(bits=bits, block_size=0), np.asarray(exp, dtype=np.int32))


def _fixed(data: np.ndarray, fmt: IntFormat, e: int) -> QTensor:
    return QTensor(data, fmt, np.full((1,) * data.ndim, e, dtype=np.int32))


def _exp_full(q: QTensor) -> np.ndarray:
    """Per-element exponents (a broadcast view: one exponent per block, repeated)."""
    return expand_blocks(np.asarray(q.exp), q.shape, q.fmt.block_axis, q.fmt.block_size)


def _embed(n: ir.Embed, x: QTensor) -> tuple[QTensor, int]:
    return embedding(n.table, x.data), 0


def _add(n: ir.Add, a: QTensor, b: QTensor) -> tuple[QTensor, int]:
    out = add(a, b, n.fmt, n.exp)
    return out, int(out.meta.get("overflow", 0))


def _align(n: ir.Align, x: QTensor) -> tuple[QTensor, int]:
    wide, e = align(x, n.reduce_axes, n.guard, n.rounding)
    return _wide(wide, e), 0


def _linear(n: ir.Linear, x: QTensor) -> tuple[QTensor, int]:
    acc, e, ov = gemm(
        x.data,
        np.asarray(x.exp),
        n.weight,
        np.array(n.w_exp, dtype=np.int32),
        acc_bits=n.acc_bits,
        acc_saturation=n.acc_saturation,
        bias=n.bias,
        e_bias=n.bias_exp,
        bias_rounding=n.bias_rounding,
    )
    return _wide(acc, e, n.acc_bits), int(ov)


def _matmul(n: ir.MatMul, a: QTensor, b: QTensor) -> tuple[QTensor, int]:
    ea = np.asarray(a.exp)
    if ea.ndim < a.data.ndim:
        ea = ea.reshape((1,) * (a.data.ndim - ea.ndim) + ea.shape)
    acc, e, ov = gemm(
        a.data.astype(np.int64, copy=False),
        ea,
        b.data,
        np.asarray(b.exp),
        acc_bits=n.acc_bits,
        acc_saturation=n.acc_saturation,
    )
    return _wide(acc, e, n.acc_bits), int(ov)


def _requant(n: ir.Requant, x: QTensor) -> tuple[QTensor, int]:
    out = requantize(x.data.astype(np.int64, copy=False), _exp_full(x), n.fmt, n.exp)
    return out, int(out.meta.get("overflow", 0))


def _rescale(n: ir.Rescale, x: QTensor) -> tuple[QTensor, int]:
    # value = acc * 2**e_acc * m * 2**-shift = y * 2**e_out  =>  y = acc * m >> (shift + e_out - e_acc)
    shift = n.shift + n.e_out - _exp_full(x).astype(np.int64)
    y, ov = requantize_mult(x.data, n.multiplier, shift, n.fmt.bits, n.fmt.signed, n.fmt.rounding, n.fmt.saturation)
    return _fixed(y.astype(n.fmt.dtype), n.fmt, n.e_out), int(ov)


def _split(n: ir.SplitHeads, x: QTensor) -> tuple[QTensor, int]:
    b, s, h = x.data.shape
    d = h // n.num_heads
    data = x.data.reshape(b, s, n.num_heads, d)
    e = np.asarray(x.exp)  # (B|1, S|1, 1): one exponent per row or per sequence
    if e.shape[-1] != 1:
        raise ExecutionError(f"node {n.name}: heads need one exponent per row, got exp shape {e.shape}")
    e4 = e.reshape(e.shape[0], e.shape[1], 1, 1)
    if n.transpose:
        if e.shape[1] != 1:
            raise ExecutionError(f"node {n.name}: keys need one exponent per sequence, got {e.shape}")
        return _wide(np.ascontiguousarray(data.transpose(0, 2, 3, 1)), e4.transpose(0, 2, 3, 1)), 0
    return _wide(np.ascontiguousarray(data.transpose(0, 2, 1, 3)), e4.transpose(0, 2, 1, 3)), 0


def _merge(n: ir.MergeHeads, x: QTensor) -> tuple[QTensor, int]:
    b, nh, s, d = x.data.shape
    data = np.ascontiguousarray(x.data.transpose(0, 2, 1, 3)).reshape(b, s, nh * d)
    e = np.asarray(x.exp)  # (B|1, nh|1, S|1, 1)
    e = e.reshape((1,) * (4 - e.ndim) + e.shape).transpose(0, 2, 1, 3)  # (B|1, S|1, nh|1, 1)
    if e.shape[2] == 1:
        return _wide(data, e[..., 0]), 0
    fmt = IntFormat(bits=x.fmt.bits, block_axis=-1, block_size=d)
    return QTensor(data, fmt, np.ascontiguousarray(e[..., 0])), 0


def _mask(n: ir.Mask, m: QTensor) -> tuple[QTensor, int]:
    keep = m.data != 0
    add_ = np.where(keep, 0, n.value).astype(np.int32)[:, None, None, :]
    return _fixed(add_, IntFormat(bits=n.bits, block_size=0), n.e_out), 0


def _nonlinear(n: ir.Nonlinear, x: QTensor, *rest: QTensor) -> tuple[QTensor, int]:
    p = n.params
    if n.kind == "softmax":
        y = softmax(x.data, rest[0].data, p)
    elif n.kind == "gelu":
        y = gelu_poly(x.data, p) if n.method == "poly" else gelu_lut(x.data, p)
    elif n.kind == "tanh":
        y = tanh_lut(x.data, p)
    else:  # layernorm: scale-invariant, the row exponent only places eps
        y = layernorm(x.data, np.asarray(x.exp), p)
        if isinstance(y, tuple):
            y = y[0]
    return _fixed(np.asarray(y), n.out_fmt, n.e_out), 0


def _take_cls(n: ir.TakeCls, x: QTensor) -> tuple[QTensor, int]:
    e = np.asarray(x.exp)
    e2 = e[:, 0] if e.shape[1] > 1 else e[:, 0]
    return QTensor(np.ascontiguousarray(x.data[:, 0]), x.fmt, np.ascontiguousarray(e2), x.mant), 0


HANDLERS: dict[type, Callable[..., tuple[QTensor, int]]] = {
    ir.Embed: _embed,
    ir.Add: _add,
    ir.Align: _align,
    ir.Linear: _linear,
    ir.MatMul: _matmul,
    ir.Requant: _requant,
    ir.Rescale: _rescale,
    ir.SplitHeads: _split,
    ir.MergeHeads: _merge,
    ir.Mask: _mask,
    ir.Nonlinear: _nonlinear,
    ir.TakeCls: _take_cls,
}


def graph_inputs(graph: ir.Graph, inputs: dict[str, np.ndarray]) -> dict[str, QTensor]:
    """Validate the id inputs and wrap them as integer tensors (exponent 0)."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise ExecutionError("input 'input_ids' is required")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise ExecutionError(f"input_ids must be a 2-D integer array, got {ids.dtype} {ids.shape}")
    b, s = ids.shape
    info = graph.info
    vocab = info.get("vocab_size")
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = np.argwhere((ids < 0) | (ids >= vocab))[0]
        raise ExecutionError(
            f"input_ids[{bad[0]}, {bad[1]}] = {int(ids[tuple(bad)])} is outside the vocabulary 0..{vocab - 1}"
        )
    max_pos = info.get("max_positions")
    off = int(info.get("position_offset", 0))
    if max_pos is not None and s + off > max_pos:
        raise ExecutionError(f"sequence length {s} exceeds the model's {max_pos} positions")
    out = {"input_ids": ids}
    mask = inputs.get("attention_mask")
    out["attention_mask"] = np.ones((b, s), np.int64) if mask is None else np.asarray(mask)
    tt = inputs.get("token_type_ids")
    tt = np.zeros((b, s), np.int64) if tt is None else np.asarray(tt)
    ntt = info.get("type_vocab_size") or 0
    if ntt and tt.size and (tt.min() < 0 or tt.max() >= ntt):
        raise ExecutionError(f"token_type_ids values must be in 0..{ntt - 1}, got {int(tt.min())}..{int(tt.max())}")
    out["token_type_ids"] = tt
    out["position_ids"] = np.broadcast_to(np.arange(off, off + s, dtype=np.int64), (b, s))
    for k, v in out.items():
        if v.shape != (b, s):
            raise ExecutionError(f"input {k} has shape {v.shape}, expected {(b, s)} like input_ids")
    fmt = IntFormat(bits=32, block_size=0)
    return {
        k: QTensor(np.ascontiguousarray(v).astype(np.int64), fmt, np.zeros((1, 1), np.int32)) for k, v in out.items()
    }


def run(
    graph: ir.Graph, inputs: dict[str, np.ndarray], trace: bool = False, profile: dict[str, float] | None = None
) -> Result:
    """Execute ``graph`` on integer id inputs; ``trace`` keeps every intermediate tensor.

    ``profile``, when given, accumulates wall seconds per IR op (nonlinear ones by kind).
    """
    env: dict[str, QTensor] = graph_inputs(graph, inputs)
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    keep = set(graph.outputs.values())
    overflow: dict[str, int] = {}
    tensors: dict[str, QTensor] = {}
    for n in graph.nodes:
        args = [env[i] for i in n.inputs]
        t0 = time.perf_counter() if profile is not None else 0.0
        out, ov = HANDLERS[type(n)](n, *args)
        if profile is not None:
            key = getattr(n, "kind", n.op)  # nonlinear nodes by kind: gelu, softmax, ...
            profile[key] = profile.get(key, 0.0) + time.perf_counter() - t0
        if out.data.dtype.kind not in "iu" or np.asarray(out.exp).dtype.kind not in "iu":
            raise ExecutionError(f"node {n.name} ({n.op}) produced a non-integer tensor {out.data.dtype}")
        env[n.name] = out
        if ov:
            overflow[n.name] = ov
        if trace:
            tensors[n.name] = out
        for i in n.inputs:  # free what no later node reads, to keep peak memory low
            uses[i] -= 1
            if uses[i] == 0 and i not in keep and not trace:
                env.pop(i, None)
    outputs = {role: env[t] for role, t in graph.outputs.items()}
    return Result(outputs=outputs, tensors=tensors, overflow=overflow)
