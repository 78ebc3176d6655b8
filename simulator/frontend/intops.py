"""Integer-op graphs (onnxruntime's ``quantize_dynamic``) rewritten to the QDQ form bbct imports.

``quantize_dynamic`` writes each linear layer as::

    x -DynamicQuantizeLinear-> (x_q, x_scale, x_zp)
    MatMulInteger(x_q, W_q, x_zp, w_zp) -Cast(float)-> Mul(., Mul(x_scale, w_scale)) -> y

and each embedding table as ``Gather(T_q, ids) -> DequantizeLinear``. Both are rewritten, before
the import, into the same values in QDQ form::

    DequantizeLinear(DynamicQuantizeLinear(x)) @ DequantizeLinear(W_q, w_scale, w_zp) -> y
    Gather(DequantizeLinear(T_q), ids)

(``y`` keeps its name, so the golden comparison still finds it). The rewritten model computes
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


def rewrite_integer_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its dynamic linear layers and quantized tables in QDQ form (a copy), or
    the model itself when it has none."""
    g = model.graph
    if not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in g.node) and not any(
        n.op_type == "Gather" and _int_table(g, n.input[0]) for n in g.node
    ):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
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
