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
from bbct.kernels.affine import affine_quantize, dynamic_quantize
from bbct.kernels.align import align
from bbct.kernels.biasadd import bias_add
from bbct.kernels.blocks import blocks_shape
from bbct.kernels.codetable import code_table
from bbct.kernels.embedding import embedding
from bbct.kernels.formats import IntFormat, QTensor, expand_blocks
from bbct.kernels.gelu import gelu_lut_counted, gelu_poly_counted
from bbct.kernels.gemm import gemm
from bbct.kernels.l2norm import l2_normalize
from bbct.kernels.layernorm import layernorm_counted
from bbct.kernels.meanpool import mean_pool, mean_pool_exp
from bbct.kernels.relu import relu
from bbct.kernels.requantize import requantize, requantize_blocks, requantize_mult
from bbct.kernels.softmax import softmax_counted
from bbct.kernels.tanh import tanh_lut_counted
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
    data, e = x.data, np.asarray(x.exp)
    f, g = x.fmt, n.fmt
    if data.ndim and f.block_axis % data.ndim == g.block_axis % data.ndim == data.ndim - 1:
        nblk = blocks_shape(data.shape, -1, g.block_size)[-1]
        if e.ndim == data.ndim and e.shape[-1] == 1:  # one exponent per row (after a matmul)
            out = requantize(data, e, g, n.exp)
            return out, int(out.meta.get("overflow", 0))
        if f.block_size == g.block_size and e.ndim == data.ndim and e.shape[-1] == nblk:  # per output block
            e_blk = np.broadcast_to(e, data.shape[:-1] + (nblk,)).reshape(-1, nblk)
            out = requantize_blocks(data.reshape(-1, data.shape[-1]), e_blk, g, n.exp, data.shape)
            return out, int(out.meta.get("overflow", 0))
    out = requantize(data.astype(np.int64, copy=False), _exp_full(x), g, n.exp)
    return out, int(out.meta.get("overflow", 0))


def _rescale(n: ir.Rescale, x: QTensor) -> tuple[QTensor, int]:
    # value = acc * 2**e_acc * m * 2**-shift = y * 2**e_out  =>  y = acc * m >> (shift + e_out - e_acc)
    e = np.asarray(x.exp, np.int64)
    shift = n.shift + n.e_out - (e if e.ndim == x.data.ndim and e.shape[-1] == 1 else _exp_full(x).astype(np.int64))
    f = n.fmt
    y, ov = requantize_mult(x.data, n.multiplier, shift, f.bits, f.signed, f.rounding, f.saturation, f.dtype)
    return _fixed(y, f, n.e_out), int(ov)


def _affine_quantize(n: ir.AffineQuantize, x: QTensor) -> tuple[QTensor, int]:
    c, ov = affine_quantize(x.data, _exp_full(x), n.multiplier, n.shift, n.zero_point, n.qmin, n.qmax, n.rounding)
    # one exponent (0) per row: the unit is the given scale, which the gemm needs aligned;
    # attention operands (B, heads, ., .): one for all, the same along either matmul axis
    e = np.zeros(c.shape[:-1] + (1,) if c.ndim < 4 else (1,) * c.ndim, np.int32)
    return _wide(c, e, n.bits), int(ov)


def _dynamic_quantize(n: ir.DynamicQuantize, x: QTensor) -> tuple[QTensor, int]:
    c, k, _ = dynamic_quantize(x.data, _exp_full(x), n.rounding)
    return _wide(c, np.full(c.shape[:-1] + (1,), k, np.int32), 10), 0


def _rescale_channels(n: ir.RescaleChannels, x: QTensor) -> tuple[QTensor, int]:
    shift = n.shift + n.e_out - (0 if n.relative else _exp_full(x).astype(np.int64))
    y, ov = requantize_mult(x.data, n.multiplier, shift, n.fmt.bits, n.fmt.signed, n.fmt.rounding, n.fmt.saturation)
    if n.relative:  # one exponent per row: the input's, moved by e_out
        return _wide(y, np.asarray(x.exp, np.int32) + np.int32(n.e_out), n.fmt.bits), int(ov)
    return _fixed(y, n.fmt, n.e_out), int(ov)


def _bias_add(n: ir.BiasAdd, x: QTensor) -> tuple[QTensor, int]:
    y, sat = bias_add(x.data, n.bias, n.fmt.bits, n.fmt.saturation)
    return QTensor(y, n.fmt, x.exp), sat


def _code_table(n: ir.CodeTable, x: QTensor) -> tuple[QTensor, int]:
    y, ev = code_table(x.data, n.table, n.c_lo)
    return _wide(y, np.asarray(x.exp), n.bits), ev


def _split(n: ir.SplitHeads, x: QTensor) -> tuple[QTensor, int]:
    b, s, h = x.data.shape
    d = h // n.num_heads
    data = x.data.reshape(b, s, n.num_heads, d)
    e = np.asarray(x.exp)  # (B|1, S|1, 1): one exponent per row or per sequence
    if e.shape[-1] != 1:
        raise ExecutionError(f"node {n.name}: heads need one exponent per row, got exp shape {e.shape}")
    e4 = e.reshape(e.shape[0], e.shape[1], 1, 1)
    if n.codes:  # given codes: their unit is the given scale, exponent 0 everywhere
        e4 = np.zeros((1, 1, 1, 1), np.int32)
    if n.transpose:
        if e4.shape[1] != 1:
            raise ExecutionError(f"node {n.name}: keys need one exponent per sequence, got {e.shape}")
        return _wide(np.ascontiguousarray(data.transpose(0, 2, 3, 1)), e4.transpose(0, 2, 3, 1)), 0
    return _wide(np.ascontiguousarray(data.transpose(0, 2, 1, 3)), e4.transpose(0, 2, 1, 3)), 0


def _merge(n: ir.MergeHeads, x: QTensor) -> tuple[QTensor, int]:
    b, nh, s, d = x.data.shape
    data = np.ascontiguousarray(x.data.transpose(0, 2, 1, 3)).reshape(b, s, nh * d)
    e = np.asarray(x.exp)  # (B|1, nh|1, S|1, 1)
    e = e.reshape((1,) * (4 - e.ndim) + e.shape).transpose(0, 2, 1, 3)  # (B|1, S|1, nh|1, 1)
    if n.codes:  # given codes: their unit is the given scale, exponent 0 in every row
        return _wide(data, np.zeros((b, s, 1), np.int32)), 0
    if e.shape[2] == 1:
        return _wide(data, e[..., 0]), 0
    fmt = IntFormat(bits=x.fmt.bits, block_axis=-1, block_size=d)
    return QTensor(data, fmt, np.ascontiguousarray(e[..., 0])), 0


def _mask(n: ir.Mask, m: QTensor | np.ndarray) -> tuple[QTensor, int]:
    # a float mask (0 / one large negative) from the index subgraph is read as a set of
    # discrete values, never computed with: it becomes integer codes here
    v = m.data if isinstance(m, QTensor) else np.asarray(m)
    if n.kind == "add":  # the float mask holds 0 or the one masking value the lowering saw
        masked = v == n.float_value
        bad = ~masked & (v != 0)
        if bad.any():
            raise ExecutionError(f"node {n.name}: mask value {v[bad].ravel()[0]!r} is neither 0 nor {n.float_value!r}")
    else:
        masked = v.astype(bool) if n.kind == "where_true" else ~v.astype(bool)
    codes = np.where(masked, n.value, 0).astype(np.int32)
    return _fixed(codes, IntFormat(bits=n.bits, block_size=0), n.e_out), 0


def _softmax(n: ir.Softmax, x: QTensor, mask: QTensor | None = None) -> tuple[QTensor, int]:
    m = np.zeros((1,) * x.data.ndim, np.int32) if mask is None else mask.data
    y, sat = softmax_counted(x.data, m, n.params)
    return _fixed(y, n.out_fmt, n.e_out), sat


def _gelu(n: ir.Gelu, x: QTensor) -> tuple[QTensor, int]:
    y, sat = gelu_poly_counted(x.data, n.params) if n.method == "poly" else gelu_lut_counted(x.data, n.params)
    return _fixed(y, n.out_fmt, n.e_out), sat


def _tanh(n: ir.Tanh, x: QTensor) -> tuple[QTensor, int]:
    y, sat = tanh_lut_counted(x.data, n.params)
    return _fixed(y, n.out_fmt, n.e_out), sat


def _layernorm(n: ir.LayerNorm, x: QTensor) -> tuple[QTensor, int]:
    y, sat = layernorm_counted(x.data, np.asarray(x.exp), n.params)  # scale-invariant: e_row only places eps
    return _fixed(y, n.out_fmt, n.e_out), sat


def _relu(n: ir.Relu, x: QTensor) -> tuple[QTensor, int]:
    y, sat = relu(x.data, n.params)
    return QTensor(y.astype(x.data.dtype, copy=False), x.fmt, x.exp, x.mant), int(sat)


def _mean_pool(n: ir.MeanPool, x: QTensor, m: QTensor) -> tuple[QTensor, int]:
    y, sat = mean_pool(x.data, m.data, n.params)
    e = mean_pool_exp(np.asarray(x.exp), n.params)
    return _wide(y, e, 62), int(sat)


def _l2(n: ir.L2Normalize, x: QTensor) -> tuple[QTensor, int]:
    y, sat = l2_normalize(x.data, np.asarray(x.exp), n.params)
    return _fixed(np.asarray(y), n.out_fmt, n.e_out), int(sat)


def _take_row(n: ir.TakeRow, x: QTensor) -> tuple[QTensor, int]:
    e = np.asarray(x.exp)
    e2 = e[:, n.index] if e.shape[1] > 1 else e[:, 0]
    return QTensor(np.ascontiguousarray(x.data[:, n.index]), x.fmt, np.ascontiguousarray(e2), x.mant), 0


HANDLERS: dict[type, Callable[..., tuple[QTensor, int]]] = {
    ir.Embed: _embed,
    ir.Add: _add,
    ir.Align: _align,
    ir.Linear: _linear,
    ir.MatMul: _matmul,
    ir.Requant: _requant,
    ir.Rescale: _rescale,
    ir.AffineQuantize: _affine_quantize,
    ir.RescaleChannels: _rescale_channels,
    ir.BiasAdd: _bias_add,
    ir.CodeTable: _code_table,
    ir.DynamicQuantize: _dynamic_quantize,
    ir.SplitHeads: _split,
    ir.MergeHeads: _merge,
    ir.Mask: _mask,
    ir.Softmax: _softmax,
    ir.Gelu: _gelu,
    ir.Tanh: _tanh,
    ir.LayerNorm: _layernorm,
    ir.Relu: _relu,
    ir.MeanPool: _mean_pool,
    ir.L2Normalize: _l2,
    ir.TakeRow: _take_row,
}


def graph_inputs(graph: ir.Graph, inputs: dict[str, np.ndarray]) -> dict[str, QTensor]:
    """Validate the id inputs (by role or by the model's input names), run the index subgraph
    (positions, masks) and wrap every integer input as a tensor (exponent 0)."""
    by_role = {role: name for name, role in graph.inputs.items()}
    ids_name = by_role.get("input_ids", "input_ids")
    ids = inputs.get(ids_name, inputs.get("input_ids"))
    if ids is None:
        raise ExecutionError("input 'input_ids' is required")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise ExecutionError(f"input_ids must be a 2-D integer array, got {ids.dtype} {ids.shape}")
    known = set(graph.inputs) | set(graph.inputs.values())
    extra = sorted(set(inputs) - known)
    if extra:
        raise ExecutionError(f"unknown inputs {extra}; the model takes {sorted(set(graph.inputs.values()))}")
    b, s = ids.shape
    info = graph.info
    vocab = info.get("vocab_size")
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = np.argwhere((ids < 0) | (ids >= vocab))[0]
        raise ExecutionError(
            f"input_ids[{bad[0]}, {bad[1]}] = {int(ids[tuple(bad)])} is outside the vocabulary 0..{vocab - 1}"
        )
    feeds: dict[str, np.ndarray] = {}
    for name, role in graph.inputs.items():
        v = inputs.get(name, inputs.get(role))
        if v is None:
            v = {
                "input_ids": ids,
                "attention_mask": np.ones((b, s), np.int64),
                "token_type_ids": np.zeros((b, s), np.int64),
                "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)),
            }[role]
        v = np.asarray(v)
        if v.shape != (b, s):
            raise ExecutionError(f"input {name} has shape {v.shape}, expected {(b, s)} like input_ids")
        if v.dtype.kind not in "iub":
            raise ExecutionError(f"input {name} must be integers, got {v.dtype}")
        if role == "attention_mask" and v.size and not np.isin(v, (0, 1)).all():
            raise ExecutionError(f"input {name} must hold 0 and 1 only")
        ntt = info.get("type_vocab_size") or 0
        if role == "token_type_ids" and ntt and v.size and (v.min() < 0 or v.max() >= ntt):
            raise ExecutionError(f"token_type_ids values must be in 0..{ntt - 1}, got {int(v.min())}..{int(v.max())}")
        feeds[name] = v
    index = graph.index.run(feeds) if graph.index is not None else {}
    _check_lookups(graph, feeds, index)
    fmt = IntFormat(bits=32, block_size=0)
    out: dict[str, QTensor] = {}
    for k, v in {**feeds, **index}.items():
        data = np.ascontiguousarray(v)
        if data.ndim == 2 and data.shape == (1, s) and b != 1:  # one row of ids (positions) for every sentence
            data = np.ascontiguousarray(np.broadcast_to(data, (b, s)))
        if data.dtype.kind == "f":  # a float mask: only a Mask node reads it
            out[k] = data  # type: ignore[assignment]
            continue
        out[k] = QTensor(data.astype(np.int64), fmt, np.zeros((1,) * max(data.ndim, 1), np.int32))
    for name, role in graph.inputs.items():
        out.setdefault(role, out[name])
    return out


def _fits(graph: ir.Graph, feeds: dict[str, np.ndarray], seq: int) -> bool:
    """Every table lookup of one all-real sentence of ``seq`` tokens stays inside its table."""
    probe = {
        k: np.zeros((1, seq), v.dtype) + (1 if graph.inputs[k] == "attention_mask" else 0) for k, v in feeds.items()
    }
    index = graph.index.run(probe) if graph.index is not None else {}
    return all(
        np.shape(index[n.inputs[0]])[-1] == seq and int(np.max(index[n.inputs[0]], initial=0)) < n.table.shape[0]
        for n in graph.nodes
        if isinstance(n, ir.Embed) and n.inputs[0] in index
    )


def _check_lookups(graph: ir.Graph, feeds: dict[str, np.ndarray], index: dict[str, np.ndarray]) -> None:
    """Computed indices (positions) must cover the sequence and stay inside their tables (a
    position table sliced to its length gives fewer positions than tokens); a too-long input
    is an error that says the longest sequence the model takes, found on the index subgraph."""
    seq = next(iter(feeds.values())).shape[1]
    for n in graph.nodes:
        if not isinstance(n, ir.Embed) or n.inputs[0] not in index:
            continue
        v, rows = np.asarray(index[n.inputs[0]]), n.table.shape[0]
        if v.shape[-1] != seq or v.size and (v.min() < 0 or v.max() >= rows):
            lo, hi = 1, seq  # the longest length that fits: lookups grow with the length
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _fits(graph, feeds, mid) else (lo, mid - 1)
            raise ExecutionError(
                f"sequence length {seq} exceeds the model's {lo} positions "
                f"({n.inputs[0]} has shape {v.shape}, values up to {int(v.max(initial=0))}; "
                f"the {n.name} table has {rows} rows)"
            )


def run(
    graph: ir.Graph,
    inputs: dict[str, np.ndarray],
    trace: bool | set[str] | frozenset[str] = False,
    profile: dict[str, float] | None = None,
) -> Result:
    """Execute ``graph`` on integer id inputs; ``trace`` keeps every intermediate tensor (True)
    or those of the named nodes (a set), freeing the others as soon as nothing reads them.

    ``profile``, when given, accumulates wall seconds per IR op (nonlinear ones by kind).
    """
    env: dict[str, QTensor] = graph_inputs(graph, inputs)
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    keep = set(graph.outputs.values())
    trace_all = trace is True
    traced = set(trace) if not isinstance(trace, bool) else set()
    overflow: dict[str, int] = {}
    tensors: dict[str, QTensor] = {}
    for n in graph.nodes:
        args = [env[i] for i in n.inputs]
        t0 = time.perf_counter() if profile is not None else 0.0
        try:
            out, ov = HANDLERS[type(n)](n, *args)
        except (ValueError, TypeError) as e:  # a kernel's contract refused its input: say which node
            raise ExecutionError(f"node {n.name} ({n.op}): {str(e).splitlines()[0]}") from None
        if profile is not None:
            key = n.op
            profile[key] = profile.get(key, 0.0) + time.perf_counter() - t0
        if out.data.dtype.kind not in "iu" or np.asarray(out.exp).dtype.kind not in "iu":
            raise ExecutionError(f"node {n.name} ({n.op}) produced a non-integer tensor {out.data.dtype}")
        env[n.name] = out
        if ov:
            overflow[n.name] = ov
        if trace_all or n.name in traced:
            tensors[n.name] = out
        for i in n.inputs:  # free what no later node reads, to keep peak memory low
            uses[i] -= 1
            if uses[i] == 0 and i not in keep and not trace_all:
                env.pop(i, None)
    outputs = {role: env[t] for role, t in graph.outputs.items()}
    return Result(outputs=outputs, tensors=tensors, overflow=overflow)
