"""Integer-op graphs (onnxruntime's ``quantize_dynamic``) rewritten to the QDQ form bbct imports.

``quantize_dynamic`` writes each linear layer as::

    x -DynamicQuantizeLinear-> (x_q, x_scale, x_zp)
    MatMulInteger(x_q, W_q, x_zp, w_zp) -Cast(float)-> Mul(., Mul(x_scale, w_scale)) -> y

and each embedding table as ``Gather(T_q, ids) -> DequantizeLinear``. Both are rewritten, before
the import, into the same values in QDQ form::

    DequantizeLinear(DynamicQuantizeLinear(x)) @ DequantizeLinear(W_q, w_scale, w_zp) -> y
    Gather(DequantizeLinear(T_q), ids)

(``y`` keeps its name, so the golden comparison still finds it). The QOperator format
(``QLinearMatMul``, and onnxruntime's ``QGemm``, ``QLinearAdd``, ``QLinearMul``,
``QLinearSoftmax``) is rewritten the same way, op by op: each quantized input through a
DequantizeLinear, the float op, a QuantizeLinear to the output's scale; the QuantizeLinear ->
DequantizeLinear pairs between ops are then the given activation formats. The rewritten model computes
the same real numbers as the original; onnxruntime's float32 sums may differ in the last bits.
A ``MatMulInteger`` in any other arrangement is left alone and refused by the importer.
"""

from __future__ import annotations

import onnx
from onnx import helper


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


# QOperator op -> (float op, input triples (x, scale, zero point), output (scale, zero point))
QOPS: dict[str, tuple[str, tuple[tuple[int, int, int], ...], tuple[int, int] | None]] = {
    "QLinearMatMul": ("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearAdd": ("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearMul": ("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    "QLinearSoftmax": ("Softmax", ((0, 1, 2),), (3, 4)),
    "QGemm": ("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8)),
}


def _qop_nodes(n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """One QOperator node as DequantizeLinear(s) -> float op -> QuantizeLinear."""
    float_op, triples, out = QOPS[n.op_type]
    ins = list(n.input) + [""] * 9
    nodes, args = [], []
    for k, (x, sc, zp) in enumerate(triples):
        t = f"{n.name or n.output[0]}_bbct_in{k}"
        nodes.append(helper.make_node("DequantizeLinear", [i for i in (ins[x], ins[sc], ins[zp]) if i], [t], name=t))
        args.append(t)
    keep = {"QGemm": ("alpha", "transA", "transB"), "QLinearSoftmax": ("axis",)}.get(n.op_type, ())
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name in keep}
    if n.op_type == "QGemm" and ins[6]:  # int32 bias at scale a_scale * b_scale
        scale, t = f"{n.name}_bbct_bias_scale", f"{n.name}_bbct_bias"
        nodes.append(helper.make_node("Mul", [ins[1], ins[4]], [scale], name=scale))
        nodes.append(helper.make_node("DequantizeLinear", [ins[6], scale], [t], name=t))
        args.append(t)
    quantized_out = out is not None and ins[out[0]]
    y = f"{n.output[0]}_bbct_float" if quantized_out else n.output[0]
    nodes.append(helper.make_node(float_op, args, [y], name=n.name, **attrs))
    if quantized_out:
        q_in = [y, ins[out[0]]] + ([ins[out[1]]] if ins[out[1]] else [])
        nodes.append(helper.make_node("QuantizeLinear", q_in, [n.output[0]], name=f"{n.name}_bbct_q"))
    return nodes


def rewrite_integer_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its dynamic linear layers and quantized tables in QDQ form (a copy), or
    the model itself when it has none."""
    g = model.graph
    if not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", *QOPS) for n in g.node) and not any(
        n.op_type == "Gather" and _int_table(g, n.input[0]) for n in g.node
    ):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = []
    for n in g.node:  # QOperator ops first: their quantized tables then read a DequantizeLinear
        qop = n.op_type in QOPS and n.domain in ("", "ai.onnx", "com.microsoft")
        if qop and not (n.op_type == "QLinearSoftmax" and any(a.name == "opset" and a.i < 13 for a in n.attribute)):
            nodes.extend(_qop_nodes(n))  # (QLinearSoftmax of opset < 13, 2-D semantics: left to be refused)
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    inits = {i.name for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    drop: set[int] = set()
    add: dict[int, list[onnx.NodeProto]] = {}  # new nodes, placed where the node of this index was
    dq_of_x: dict[str, str] = {}
    for idx, n in enumerate(g.node):
        if n.op_type == "MatMulInteger":
            chain = _dynamic_linear(n, prod, cons, inits)
            if chain is None:
                continue
            dql, cast, mul, smul, w_scale = chain
            new: list[onnx.NodeProto] = []
            x_dq = dq_of_x.get(dql.output[0])
            if x_dq is None:
                x_dq = dql.output[0] + "_bbct_dq"
                dq_of_x[dql.output[0]] = x_dq
                new.append(helper.make_node("DequantizeLinear", list(dql.output), [x_dq], name=x_dq))
            w_dq = n.input[1] + "_bbct_dq"
            w_in = [n.input[1], w_scale] + ([n.input[3]] if len(n.input) > 3 and n.input[3] else [])
            new.append(helper.make_node("DequantizeLinear", w_in, [w_dq], name=w_dq, axis=1))
            new.append(helper.make_node("MatMul", [x_dq, w_dq], list(mul.output), name=n.name))
            add[idx] = new
            drop.update(id(x) for x in (n, cast, mul))
            if all(id(u) in drop or u is mul for u in cons.get(smul.output[0], [])):
                drop.add(id(smul))
        elif n.op_type == "Gather" and _int_table(g, n.input[0]):
            users = cons.get(n.output[0], [])
            if len(users) != 1 or users[0].op_type != "DequantizeLinear":
                continue
            dq = users[0]
            t_dq = n.input[0] + "_bbct_dq"
            table = helper.make_node("DequantizeLinear", [n.input[0], *dq.input[1:]], [t_dq], name=t_dq)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            gather = helper.make_node("Gather", [t_dq, n.input[1]], list(dq.output), name=n.name, **attrs)
            add[idx] = [table, gather]
            drop.update((id(n), id(dq)))
    nodes: list[onnx.NodeProto] = []
    for idx, n in enumerate(g.node):
        nodes.extend(add.get(idx, []))
        if id(n) not in drop and idx not in add:
            nodes.append(n)
    # a dropped node may come after the place of its replacement: keep topological order
    del g.node[:]
    g.node.extend(_toposort(nodes, {i.name for i in g.input} | inits))
    return m


def _int_table(g: onnx.GraphProto, t: str) -> bool:
    init = next((i for i in g.initializer if i.name == t), None)
    return init is not None and len(init.dims) == 2 and init.data_type in (2, 3)  # uint8, int8


def _dynamic_linear(n, prod, cons, inits):
    """(DynamicQuantizeLinear, Cast, output Mul, scale Mul, weight scale name) of a dynamic
    linear layer around MatMulInteger ``n``, or None."""
    dql = prod.get(n.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or n.input[1] not in inits:
        return None
    if len(n.input) > 2 and n.input[2] and n.input[2] != dql.output[2]:
        return None
    users = cons.get(n.output[0], [])
    if len(users) != 1 or users[0].op_type != "Cast":
        return None
    cast = users[0]
    users = cons.get(cast.output[0], [])
    if len(users) != 1 or users[0].op_type != "Mul":
        return None
    mul = users[0]
    other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    smul = prod.get(other)
    if smul is None or smul.op_type != "Mul" or dql.output[1] not in smul.input:
        return None
    w_scale = smul.input[1] if smul.input[0] == dql.output[1] else smul.input[0]
    if w_scale not in inits:
        return None
    return dql, cast, mul, smul, w_scale


def _toposort(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    have = set(known) | {""}
    out, left = [], list(nodes)
    while left:
        rest = []
        for n in left:
            if all(i in have for i in n.input):
                out.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(left):  # inputs from outside (Constant-free cycles cannot occur): keep order
            out.extend(rest)
            break
        left = rest
    return out
