"""bbct's integer model written as standard ONNX QDQ (opset 21), loadable by onnxruntime.

What a QDQ file holds of bbct's integer model:

* **weights and embedding tables**: every stored integer weight becomes an initializer of
  codes (int8, int4 or int16) read by a ``DequantizeLinear`` that gives back the tensor the
  graph used (same name, so the rest of the graph is untouched). bbct's block scales are
  written exactly: power-of-two scales ``2**exp`` (and ``mant * 2**exp`` multipliers) are
  float32 numbers, blocks of ``weight_block`` along the reduction axis are opset 21's
  ``block_size``, one block over the whole axis a per-channel ``axis``;
* **nothing else in integers**. Activations are block-scaled at run time (dynamic exponents
  per 32 values, or calibrated ones), which no QDQ scale expresses; bbct's integer nonlinear
  kernels (softmax, LayerNorm, GELU, tanh, L2 norm, mean pooling: polynomials, LUTs, integer
  square roots) have no ONNX form. Those nodes stay float ops; each is marked with a
  ``doc_string`` naming the bbct kernel and its settings, and the model's ``metadata_props``
  carry the config and the list (``bbct_integer_kernels``), so a reader knows where
  onnxruntime's run departs from bbct's.

Importing the file back gives the same integer weights, bit for bit: the dequantized values
are exact, and quantizing them again under the same config finds the same exponents and codes
(round-to-nearest weights; tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from bbct.golden.atomic import write_bytes
from bbct.golden.errors import BbctError
from bbct.kernels.formats import EXP_ZERO, QTensor
from bbct.simulator import ir
from bbct.simulator.config import Config
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
    if transpose:
        codes, scales, axis = codes.T, scales.T, 1 - axis
    dtype, np_t = _code_type(q.fmt.bits)
    c = helper.make_tensor(f"{name}_bbct_codes", dtype, codes.shape, codes.astype(np_t).ravel().tolist())
    if n_blocks == 1:  # one block over the reduction axis: a scale per channel of the other axis
        other = 1 - axis
        s = numpy_helper.from_array(np.ascontiguousarray(scales.reshape(-1)), f"{name}_bbct_scale")
        node = helper.make_node("DequantizeLinear", [c.name, s.name], [name], name=f"{name}_bbct_dq", axis=other)
    else:
        block = int(np.ceil(codes.shape[axis] / n_blocks))
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


def export_qdq(
    model_path: str | Path, fg: F.FGraph, graph: ir.Graph, config: Config, out: str | Path
) -> dict[str, object]:
    """Write the QDQ model to ``out`` (atomically); returns what was written."""
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
    meta = {
        "bbct_config": json.dumps(config.to_dict()),
        "bbct_integer_kernels": json.dumps(marked),
        "bbct_activations": "block-scaled at run time by bbct (not expressible as QDQ scales): float here",
    }
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise BbctError(f"export: the written model does not validate: {str(e).splitlines()[0]}") from None
    write_bytes(out, model.SerializeToString())
    return {"out": str(out), "weights": done, "kernels": marked}
