"""bbct's integer model written as standard ONNX QDQ (opset 21), loadable by onnxruntime.

What a QDQ file holds of bbct's integer model:

* **weights and embedding tables**: every stored integer weight becomes an initializer of
  codes (int8, int4 or int16) read by a ``DequantizeLinear`` that gives back the tensor the
  graph used (same name, so the rest of the graph is untouched). bbct's block scales are
  written exactly: power-of-two scales ``2**exp`` (and ``mant * 2**exp`` multipliers) are
  float32 numbers, blocks of ``weight_block`` along the reduction axis are opset 21's
  ``block_size``, one block over the whole axis a per-channel ``axis``;
* **static activations** (``scaling="static"``, calibrated block exponents): each becomes
  ``QuantizeLinear -> DequantizeLinear`` with one power-of-two scale per channel (its block's
  ``2**exp``; int8 or int16 codes, zero point 0), marked ``doc_string = "bbct:static-activation
  ..."``, so onnxruntime rounds the tensor where bbct does;
* **nothing else in integers**. Run-time (dynamic) activation exponents, per 32 values from
  their maximum, have no QDQ form; bbct's integer nonlinear kernels (softmax, LayerNorm, GELU,
  tanh, L2 norm, mean pooling: polynomials, LUTs, integer square roots) have no ONNX form.
  Those nodes stay float ops; each is marked with a ``doc_string`` naming the bbct kernel and
  its settings, and the model's ``metadata_props`` carry the config and the list
  (``bbct_integer_kernels``), so a reader knows where onnxruntime's run departs from bbct's.

Importing the file back gives bbct's integer model bit for bit under the same config: the
weights are read as their given codes and block scales (never quantized again, so GPTQ and
clip-searched exponents survive), the marked activation pairs as the given static exponents
(:func:`read_static_activations`). An all-zero block (``EXP_ZERO``) is written with scale 1.0
and read back as ``EXP_ZERO``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from bbct.golden.atomic import write_bytes
from bbct.golden.errors import BbctError
from bbct.kernels.blocks import effective_block
from bbct.kernels.formats import EXP_ZERO, IntFormat, QTensor
from bbct.simulator import ir
from bbct.simulator.config import Config
from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.lower import assign_roles

OPSET = 21
KERNELS = (ir.Softmax, ir.LayerNorm, ir.Gelu, ir.Tanh, ir.L2Normalize, ir.MeanPool, ir.Relu)


def _code_type(bits: int) -> tuple[int, type]:
    if bits <= 4:
        return onnx.TensorProto.INT4, np.int8
    if bits <= 8:
        return onnx.TensorProto.INT8, np.int8
    if bits <= 16:
        return onnx.TensorProto.INT16, np.int16
    raise BbctError(f"export: {bits}-bit weight codes have no ONNX integer type of that width")


def _scales(q: QTensor) -> np.ndarray:
    """The per-block real scales, exactly, as float32 (an all-zero block: 1.0, its codes are 0)."""
    e = np.asarray(q.exp, np.int64)
    zero = e <= EXP_ZERO
    if np.any(~zero & ((e < -149) | (e > 127))):
        raise BbctError(f"export: a block exponent outside float32's range ({int(e[~zero].min())}..{int(e.max())})")
    s = np.ldexp(1.0, np.where(zero, 0, e))
    if q.mant is not None:
        s = s * np.where(zero, 1, np.asarray(q.mant, np.float64))
    out = s.astype(np.float32)
    if not np.array_equal(out.astype(np.float64), s):
        raise BbctError("export: a block scale is not exactly a float32 (multiplier wider than 24 bits)")
    return out


def _dequantize_node(name: str, q: QTensor, transpose: bool) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """``DequantizeLinear(codes, scale)`` producing ``name``: blocks along the stored tensor's
    block axis (``block_size``), or one scale per channel when one block spans the axis."""
    codes = np.asarray(q.data)
    scales = _scales(q)
    axis = q.fmt.block_axis % codes.ndim
    n_blocks = scales.shape[axis]
    block = effective_block(codes.shape[axis], q.fmt.block_size)  # the last block may be shorter
    if transpose:
        codes, scales, axis = codes.T, scales.T, 1 - axis
    dtype, np_t = _code_type(q.fmt.bits)
    c = helper.make_tensor(f"{name}_bbct_codes", dtype, codes.shape, codes.astype(np_t).ravel().tolist())
    if n_blocks == 1:  # one block over the reduction axis: a scale per channel of the other axis
        other = 1 - axis
        s = numpy_helper.from_array(np.ascontiguousarray(scales.reshape(-1)), f"{name}_bbct_scale")
        node = helper.make_node("DequantizeLinear", [c.name, s.name], [name], name=f"{name}_bbct_dq", axis=other)
    else:
        s = numpy_helper.from_array(np.ascontiguousarray(scales), f"{name}_bbct_scale")
        node = helper.make_node(
            "DequantizeLinear", [c.name, s.name], [name], name=f"{name}_bbct_dq", axis=axis, block_size=block
        )
    return node, [c, s]


def _stored_weights(fg: F.FGraph, graph: ir.Graph) -> dict[str, tuple[QTensor, np.ndarray]]:
    """Initializer name -> the integer tensor bbct stores for it (linears and tables) and the
    float tensor it quantized (as the float graph holds it: a Gemm's transB undone)."""
    roles = assign_roles(fg)
    by_name = {n.name: n for n in graph.nodes}
    out: dict[str, tuple[QTensor, np.ndarray]] = {}
    for n in fg.nodes:
        if type(n) is F.Linear and n.weight_name:
            lin = by_name.get(roles[n.name].short + ".acc")
            if isinstance(lin, ir.Linear) and lin.stored is not None:
                out.setdefault(n.weight_name, (lin.stored, n.weight))
    tables = [
        t
        for n in fg.nodes
        if isinstance(n, (F.Embedding, F.EmbeddingSum))
        for t in (
            zip(n.table_names, n.tables, strict=True) if isinstance(n, F.EmbeddingSum) else ((n.table_name, n.table),)
        )
    ]
    embeds = [n for n in graph.nodes if isinstance(n, ir.Embed)]
    if len(embeds) == len(tables):
        for (t, w), e in zip(tables, embeds, strict=True):
            out.setdefault(t, (e.table, w))
    return out


def _mark_kernels(model: onnx.ModelProto, graph: ir.Graph) -> list[dict[str, str]]:
    prod = {o: n for n in model.graph.node for o in n.output}
    marked = []
    readers: dict[str, str] = {}  # a kernel without a golden name is compared after its requant
    for n in graph.nodes:
        for i in n.inputs:
            if n.onnx_name and i not in readers:
                readers[i] = n.onnx_name
    for n in graph.nodes:
        name = n.onnx_name or readers.get(n.name)
        if not isinstance(n, KERNELS) or not name:
            continue
        node = prod.get(name)
        what = f"bbct:integer-kernel {n.op} ({n.attrs()})"
        if node is not None:
            node.doc_string = what
        marked.append({"onnx_tensor": name, "onnx_node": node.name if node is not None else "", "bbct": what})
    return marked


ACT_MARK = "bbct:static-activation"


def _static_activations(graph: ir.Graph) -> dict[str, tuple[np.ndarray, IntFormat]]:
    """ONNX tensor -> (block exponents along the hidden axis, format) of every activation bbct
    requantizes with calibrated (static) block exponents."""
    out: dict[str, tuple[np.ndarray, IntFormat]] = {}
    for n in graph.nodes:
        if isinstance(n, (ir.Requant, ir.Add)) and n.exp is not None and n.fmt.block_size and n.onnx_name:
            out.setdefault(n.onnx_name, (np.asarray(n.exp, np.int64).reshape(-1), n.fmt))
    return out


def _hidden_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """The last dimension of every tensor whose shape inference knows it."""
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # shape inference is a convenience: a tensor without a size is not written
        return {}
    out = {}
    for v in list(g.value_info) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            out[v.name] = int(dims[-1].dim_value)
    return out


def _write_activations(model: onnx.ModelProto, graph: ir.Graph) -> tuple[list[str], dict[str, str]]:
    """Each static activation ``t`` becomes ``QuantizeLinear -> DequantizeLinear`` (per channel
    of the last axis, the scale ``2**exp`` of the channel's block; int8 or int16 codes, zero
    point 0), producing ``t`` again, so onnxruntime rounds it where bbct does. Returns the
    tensors written and the ones that could not be (why)."""
    acts = _static_activations(graph)
    sizes = _hidden_sizes(model)
    g = model.graph
    pairs: dict[str, list[onnx.NodeProto]] = {}
    skipped: dict[str, str] = {}
    for t, (exp, fmt) in acts.items():
        h = sizes.get(t)
        bs = fmt.block_size
        if h is None or -(-h // effective_block(h, bs)) != exp.size:
            skipped[t] = "its hidden size is not known"
            continue
        if np.any(exp <= EXP_ZERO) or np.any((exp < -126) | (exp > 127)):
            skipped[t] = "a block exponent outside float32's normal range (or a block calibrated to zero)"
            continue
        per = np.repeat(exp, effective_block(h, bs))[:h]
        scale = numpy_helper.from_array(np.ldexp(1.0, per).astype(np.float32), f"{t}_bbct_ascale")
        zp_t = np.int8 if fmt.bits <= 8 else np.int16
        zp = numpy_helper.from_array(np.zeros(h, zp_t), f"{t}_bbct_azp")
        doc = f"{ACT_MARK} {fmt.short()} (calibrated block exponents, one scale per channel)"
        q = helper.make_node(
            "QuantizeLinear",
            [f"{t}_bbct_float", scale.name, zp.name],
            [f"{t}_bbct_codes"],
            name=f"{t}_bbct_aq",
            axis=-1,
        )
        dq = helper.make_node(
            "DequantizeLinear", [q.output[0], scale.name, zp.name], [t], name=f"{t}_bbct_adq", axis=-1
        )
        q.doc_string = dq.doc_string = doc
        g.initializer.extend([scale, zp])
        pairs[t] = [q, dq]
    nodes = []
    for n in g.node:
        for i, o in enumerate(n.output):
            if o in pairs:
                n.output[i] = f"{o}_bbct_float"
        nodes.append(n)
        for o in n.output:
            if o.endswith("_bbct_float") and o[: -len("_bbct_float")] in pairs:
                nodes += pairs[o[: -len("_bbct_float")]]
    del g.node[:]
    g.node.extend(nodes)
    return list(pairs), skipped


def read_static_activations(
    model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None
) -> tuple[onnx.ModelProto, dict[str, dict[str, object]]]:
    """The inverse of the activation pairs :func:`export_qdq` writes: each marked
    ``QuantizeLinear -> DequantizeLinear`` is removed (the float graph is the model's) and
    its power-of-two scales become the tensor's given static exponents, one per channel:
    ``{tensor: {"exp": int array, "bits": 8|16, "source": node}}``. A model without them is
    returned as it is. ``weights``: the values of detached initializers
    (:func:`bbct.golden.runner.detach_weights`)."""
    weights = weights or {}

    def value(t: onnx.TensorProto) -> np.ndarray:
        return weights[t.name] if t.name in weights else numpy_helper.to_array(t)

    if not any(n.op_type == "DequantizeLinear" and n.doc_string.startswith(ACT_MARK) for n in model.graph.node):
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear" and n.doc_string.startswith(ACT_MARK)]
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    drop, rename, acts = set(), {}, {}
    for dq in dqs:
        q = prod.get(dq.input[0])
        scale = inits.get(dq.input[1]) if len(dq.input) > 1 else None
        if q is None or q.op_type != "QuantizeLinear" or scale is None:
            raise UnsupportedGraphError(
                f"node {dq.name!r} (DequantizeLinear): a {ACT_MARK} pair without its QuantizeLinear or scale"
            )
        s = value(scale).astype(np.float64)
        f, k = np.frexp(s)
        if not np.all(f == 0.5):
            raise UnsupportedGraphError(f"node {dq.name!r} (DequantizeLinear): {ACT_MARK} scales must be powers of two")
        zp = value(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        bits = 16 if zp is not None and zp.dtype == np.int16 else 8
        acts[dq.output[0]] = {"exp": (k - 1).astype(np.int64), "bits": bits, "source": dq.name}
        rename[q.input[0]] = dq.output[0]
        drop |= {id(q), id(dq)}
    nodes = [n for n in g.node if id(n) not in drop]
    for n in nodes:
        for i, o in enumerate(n.output):
            n.output[i] = rename.get(o, o)
        for i, x in enumerate(n.input):
            n.input[i] = rename.get(x, x)
    del g.node[:]
    g.node.extend(nodes)
    return m, acts


def export_qdq(
    model_path: str | Path,
    fg: F.FGraph,
    graph: ir.Graph,
    config: Config,
    out: str | Path,
    activations: bool = True,
) -> dict[str, object]:
    """Write the QDQ model to ``out`` (atomically); returns what was written. ``activations``:
    also the static activations' exponents as QuantizeLinear/DequantizeLinear pairs."""
    model = onnx.load(str(model_path))
    try:
        model = version_converter.convert_version(model, OPSET)
    except Exception as e:  # the converter's own errors: say which model and why, in one line
        raise BbctError(f"export: {model_path}: cannot convert to opset {OPSET}: {str(e).splitlines()[0]}") from None
    g = model.graph
    stored = _stored_weights(fg, graph)
    inits = {i.name: i for i in g.initializer}
    new_nodes, new_inits, done = [], [], []
    for name, (q, w) in stored.items():
        init = inits.get(name)
        if init is None:  # a weight computed in the graph (already quantized, transposed copy): left as is
            continue
        v = numpy_helper.to_array(init)
        if v.shape == w.shape and np.array_equal(v, w):
            transpose = False
        elif v.shape == w.shape[::-1] and np.array_equal(v.T, w):
            transpose = True  # Gemm transB keeps W as (out, in)
        else:
            continue
        node, tensors = _dequantize_node(name, q, transpose)
        new_nodes.append(node)
        new_inits += tensors
        g.initializer.remove(init)
        done.append(name)
    g.initializer.extend(new_inits)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    marked = _mark_kernels(model, graph)
    written, skipped = _write_activations(model, graph) if activations else ([], {})
    dynamic = "block-scaled at run time by bbct (not expressible as QDQ scales): float here"
    meta = {
        "bbct_config": json.dumps(config.to_dict()),
        "bbct_integer_kernels": json.dumps(marked),
        "bbct_activations": json.dumps(
            {"static_written": written, "static_not_written": skipped, "others": dynamic}
            if written or skipped
            else dynamic
        ),
    }
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise BbctError(f"export: the written model does not validate: {str(e).splitlines()[0]}") from None
    write_bytes(out, model.SerializeToString())
    return {"out": str(out), "weights": done, "kernels": marked, "activations": written}
