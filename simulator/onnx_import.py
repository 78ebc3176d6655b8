"""Import: recognise the BERT structure in an ONNX graph and return a float :class:`BertSpec`.

The importer anchors on the operators every BERT export keeps — ``Softmax`` for each
attention, ``MatMul``/``Gemm`` with an initializer for each linear layer, ``Gather`` on
tables for embeddings, ``LayerNormalization`` (or its ReduceMean/Sub/Pow/Sqrt/Div
decomposition) — and walks the dataflow between them through the view ops exporters put
in the way (Reshape, Transpose, Squeeze, Unsqueeze, Cast, Identity, Flatten). Shape
subgraphs (Shape/Gather/Concat/Range/Expand/Where/IsNaN/...) are never interpreted op by
op: a scalar constant they compute (an attention scale, a mask value) is folded by
evaluating the graph once with concrete batch and sequence sizes in onnxruntime.

Tested on TorchScript (``dynamo=False``) and dynamo exports, opsets 14-21, eager and SDPA
attention, erf and tanh GELU, BertModel and BertForSequenceClassification.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from golden.runner import GoldenRunner, load_onnx
from simulator import spec as S
from simulator.errors import UnsupportedGraphError

VIEW_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten")
SUPPORTED = (
    "embeddings: Gather(word/position/token_type tables) + Add + LayerNorm; "
    "attention: MatMul(+Add) Q/K/V, Reshape/Transpose heads, MatMul QK^T, Mul/Div scale, Add mask "
    "(Where/Sub/Mul forms), Softmax (optionally IsNaN/Where), MatMul PV, output MatMul+Add; "
    "residual Add + LayerNormalization or ReduceMean/Sub/Pow/Sqrt/Div decomposition; "
    "FFN MatMul+Add, GELU (Erf form, Gelu op, tanh approximation), MatMul+Add; "
    "pooler Gather/Slice CLS + Gemm|MatMul+Add + Tanh; classifier Gemm|MatMul+Add"
)


class _Graph:
    """Producer/consumer maps, constants, and a once-only numeric probe of the graph."""

    def __init__(self, model: onnx.ModelProto, batch: int, seq: int) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.prod: dict[str, onnx.NodeProto] = {}
        self.cons: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                self.prod[o] = n
            for i in n.input:
                self.cons.setdefault(i, []).append(n)
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.batch, self.seq = batch, seq
        self._cache: dict[str, np.ndarray | None] = {}
        self._probe: dict[str, np.ndarray] | None = None

    def init(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def const(self, name: str) -> np.ndarray | None:
        """Value of a tensor that does not depend on the model inputs, else None."""
        if name in self._cache:
            return self._cache[name]
        v = self.init(name)
        if v is None:
            n = self.prod.get(name)
            if n is not None and n.op_type == "Constant":
                v = (
                    numpy_helper.to_array(next(a.t for a in n.attribute if a.name == "value"))
                    if any(a.name == "value" for a in n.attribute)
                    else None
                )
                if v is None:
                    for a in n.attribute:
                        if a.name in ("value_float", "value_int"):
                            v = np.array(onnx.helper.get_attribute_value(a))
            elif n is not None and n.op_type in (
                "Cast",
                "Identity",
                "Sqrt",
                "Reciprocal",
                "Mul",
                "Div",
                "Neg",
                "Unsqueeze",
                "Squeeze",
                "Reshape",
                "Pow",
                "Sub",
                "Add",
            ):
                ins = [self.const(i) for i in n.input if i]
                if all(x is not None for x in ins):
                    v = self.probe_value(name)
        self._cache[name] = v
        return v

    def probe_value(self, name: str) -> np.ndarray | None:
        """The tensor's value for concrete (batch, seq) sizes: folds shape-derived scalars."""
        if self._probe is None:
            runner = GoldenRunner(self.model)
            ids = np.ones((self.batch, self.seq), np.int64)
            feeds = {k: ids for k in self.inputs}
            self._probe = runner.run_all(feeds).values
        return self._probe.get(name)

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        if v is None:
            v = self.probe_value(name)
        if v is None or np.size(v) != 1:
            return None
        return float(np.asarray(v).ravel()[0])

    def consumers(self, name: str, op: str | tuple[str, ...] | None = None) -> list[onnx.NodeProto]:
        ops = (op,) if isinstance(op, str) else op
        return [n for n in self.cons.get(name, []) if ops is None or n.op_type in ops]

    def back(self, name: str) -> tuple[str, onnx.NodeProto | None]:
        """Walk back through view ops: (tensor, its producer) of the first real value."""
        n = self.prod.get(name)
        while n is not None and n.op_type in VIEW_OPS:
            name = n.input[0]
            n = self.prod.get(name)
        return name, n

    def fwd(self, name: str) -> str:
        """Walk forward through single-consumer view ops."""
        while True:
            c = self.cons.get(name, [])
            if len(c) == 1 and c[0].op_type in VIEW_OPS:
                name = c[0].output[0]
            else:
                return name


def _err(node: onnx.NodeProto | None, what: str) -> UnsupportedGraphError:
    where = f"node {node.name or '(unnamed)'} ({node.op_type})" if node is not None else "graph"
    return UnsupportedGraphError(f"{where}: {what}. Supported BERT structure: {SUPPORTED}")


def _attr(n: onnx.NodeProto, name: str, default):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Importer:
    def __init__(self, g: _Graph) -> None:
        self.g = g

    # -- linear ---------------------------------------------------------------------------
    def linear_from_output(self, out: str) -> S.Linear:
        """The Linear whose (bias-added) output tensor is ``out``."""
        g = self.g
        n = g.prod.get(out)
        if n is None:
            raise _err(None, f"tensor {out!r} has no producer where a linear layer was expected")
        if n.op_type == "Gemm":
            w = g.const(n.input[1])
            if w is None:
                raise _err(n, "Gemm weight is not a constant")
            if _attr(n, "transB", 0):
                w = w.T
            b = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            alpha, beta = _attr(n, "alpha", 1.0), _attr(n, "beta", 1.0)
            if alpha != 1.0 or beta != 1.0 or _attr(n, "transA", 0):
                raise _err(n, "Gemm with alpha/beta != 1 or transA")
            return S.Linear(
                np.ascontiguousarray(w, np.float32), None if b is None else b.astype(np.float32), {S.ROLE_OUT: out}
            )
        bias = None
        mm = n
        if n.op_type == "Add":
            for i, j in ((0, 1), (1, 0)):
                b = g.const(n.input[i])
                p = g.prod.get(n.input[j])
                if b is not None and p is not None and p.op_type == "MatMul":
                    bias, mm = b, p
                    break
            else:
                raise _err(n, "expected MatMul + Add(bias) for a linear layer")
        if mm.op_type != "MatMul":
            raise _err(mm, "expected MatMul or Gemm for a linear layer")
        w = g.const(mm.input[1])
        if w is None or w.ndim != 2:
            raise _err(mm, "MatMul weight is not a 2-D constant")
        if bias is not None and bias.shape != (w.shape[1],):
            raise _err(n, f"bias shape {bias.shape} does not match weight {w.shape}")
        return S.Linear(
            np.ascontiguousarray(w, np.float32), None if bias is None else bias.astype(np.float32), {S.ROLE_OUT: out}
        )

    def linear_input(self, lin_out: str) -> str:
        n = self.g.prod[lin_out]
        if n.op_type == "Gemm":
            return n.input[0]
        if n.op_type == "Add":
            n = next(self.g.prod[i] for i in n.input if i in self.g.prod and self.g.prod[i].op_type == "MatMul")
        return n.input[0]

    def linear_consumer(self, x: str) -> str:
        """Output name of the linear layer that reads ``x`` (through view ops)."""
        g = self.g
        for c in g.cons.get(x, []):
            if c.op_type == "Gemm" and g.const(c.input[1]) is not None:
                return c.output[0]
            if c.op_type == "MatMul" and g.const(c.input[1]) is not None:
                adds = g.consumers(c.output[0], "Add")
                if len(adds) == 1 and any(g.const(i) is not None for i in adds[0].input):
                    return adds[0].output[0]
                return c.output[0]
        for c in g.cons.get(x, []):
            if c.op_type in VIEW_OPS:
                try:
                    return self.linear_consumer(c.output[0])
                except UnsupportedGraphError:
                    pass
        raise _err(g.prod.get(x), f"no linear layer reads {x!r}")

    # -- layer norm -----------------------------------------------------------------------
    def layernorm_after(self, x: str) -> S.LayerNorm:
        """The LayerNorm whose input is ``x``."""
        g = self.g
        for c in g.consumers(x, "LayerNormalization"):
            gamma = g.const(c.input[1])
            beta = g.const(c.input[2]) if len(c.input) > 2 and c.input[2] else None
            if gamma is None or _attr(c, "axis", -1) != -1:
                raise _err(c, "LayerNormalization needs constant scale and the last axis")
            beta = np.zeros_like(gamma) if beta is None else beta
            return S.LayerNorm(
                gamma.astype(np.float32),
                beta.astype(np.float32),
                float(_attr(c, "epsilon", 1e-5)),
                {S.ROLE_OUT: c.output[0], "in": x},
            )
        # decomposed: ReduceMean(x) -> Sub(x, mean) -> Pow/Mul -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul -> Add
        subs = [c for c in g.consumers(x, "Sub")]
        for sub in subs:
            d = sub.output[0]
            div = next((c for c in g.consumers(d, "Div")), None)
            if div is None:
                continue
            sq = g.prod.get(div.input[1])
            if sq is None or sq.op_type != "Sqrt":
                continue
            add = g.prod.get(sq.input[0])
            eps = None
            if add is not None and add.op_type == "Add":
                eps = next((g.scalar(i) for i in add.input if g.const(i) is not None), None)
            mul = g.consumers(div.output[0], "Mul")
            if len(mul) != 1:
                continue
            gamma = next((g.const(i) for i in mul[0].input if g.const(i) is not None), None)
            addb = g.consumers(mul[0].output[0], "Add")
            beta = next((g.const(i) for i in addb[0].input if g.const(i) is not None), None) if addb else None
            if gamma is None or eps is None:
                continue
            out = addb[0].output[0] if beta is not None else mul[0].output[0]
            beta = np.zeros_like(gamma) if beta is None else beta
            names = {S.ROLE_OUT: out, "in": x}
            return S.LayerNorm(gamma.astype(np.float32), beta.astype(np.float32), float(eps), names)
        raise _err(g.prod.get(x), f"no LayerNorm (fused or decomposed) reads {x!r}")

    # -- attention ------------------------------------------------------------------------
    def scaled_source(self, t: str) -> tuple[str, float]:
        """Walk back through view ops and constant Mul/Div: (source tensor, product of scales)."""
        g = self.g
        scale = 1.0
        while True:
            t, n = g.back(t)
            if n is not None and n.op_type in ("Mul", "Div"):
                c = g.scalar(n.input[1])
                if c is not None:
                    scale *= c if n.op_type == "Mul" else 1.0 / c
                    t = n.input[0]
                    continue
                c = g.scalar(n.input[0]) if n.op_type == "Mul" else None
                if c is not None:
                    scale *= c
                    t = n.input[1]
                    continue
            return t, scale

    def mask_value(self, mask: str) -> float:
        """The additive value of a padded key: the most negative finite-or-inf constant feeding the mask."""
        g = self.g
        seen, stack, vals = set(), [mask], []
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            c = g.const(t)
            if c is not None and np.size(c) <= 4 and np.asarray(c).dtype.kind == "f":
                vals.extend(float(v) for v in np.asarray(c).ravel())
            n = g.prod.get(t)
            if n is not None:
                stack.extend(i for i in n.input if i)
        neg = [v for v in vals if v <= -1e3]
        if not neg:
            return -10000.0
        v = min(neg)
        return float(np.finfo(np.float32).min) if not math.isfinite(v) else v

    def attention(self, sm: onnx.NodeProto, hidden: int) -> tuple[S.Attention, str]:
        g = self.g
        if _attr(sm, "axis", -1) not in (-1, 3):
            raise _err(sm, "Softmax over an axis other than the last")
        scores = sm.input[0]
        n = g.prod.get(scores)
        mask_value = -10000.0
        pre = scores
        if n is not None and n.op_type == "Add":
            a, b = n.input

            # the scores side leads back to a MatMul of two non-constant operands
            def is_scores(t: str) -> bool:
                s, _ = self.scaled_source(t)
                p = g.prod.get(s)
                return p is not None and p.op_type == "MatMul" and g.const(p.input[1]) is None

            if is_scores(a):
                pre, mask_t = a, b
            elif is_scores(b):
                pre, mask_t = b, a
            else:
                raise _err(n, "cannot tell the scores from the mask at the Softmax input")
            mask_value = self.mask_value(mask_t)
        src, scale = self.scaled_source(pre)
        mm = g.prod.get(src)
        if mm is None or mm.op_type != "MatMul":
            raise _err(sm, "expected MatMul(Q, K^T) before the Softmax")
        q_src, q_scale = self.scaled_source(mm.input[0])
        k_src, k_scale = self.scaled_source(mm.input[1])
        scale *= q_scale * k_scale
        # the softmax output (optionally through an IsNaN/Where guard) feeds MatMul(P, V)
        probs = sm.output[0]
        pv = g.consumers(probs, "MatMul")
        if not pv:
            w = g.consumers(probs, "Where")
            if w:
                probs_used = w[0].output[0]
                pv = g.consumers(probs_used, "MatMul")
        if not pv:
            raise _err(sm, "no MatMul(P, V) after the Softmax")
        pv = pv[0]
        v_src, _ = self.scaled_source(pv.input[1])
        ctx = g.fwd(pv.output[0])
        out_name = self.linear_consumer(ctx)
        lin = {}
        for role, t in (("q", q_src), ("k", k_src), ("v", v_src)):
            lin[role] = self.linear_from_output(t)
        out = self.linear_from_output(out_name)
        d = None
        if abs(scale) > 0:
            d_est = 1.0 / (scale * scale)
            if abs(d_est - round(d_est)) < 1e-3 * d_est and round(d_est) > 0:
                d = int(round(d_est))
        heads = self.heads(mm.input[0]) or (hidden // d if d and hidden % d == 0 else None)
        if heads is None:
            raise _err(mm, "cannot determine the number of heads")
        names = {S.ROLE_SCORES: scores, S.ROLE_PROBS: sm.output[0], S.ROLE_CONTEXT: self.linear_input(out_name)}
        att = S.Attention(lin["q"], lin["k"], lin["v"], out, heads, float(scale), float(mask_value), names)
        return att, out_name

    def heads(self, q_heads: str) -> int | None:
        """Heads from the 4-D shape of the per-head queries (probed once)."""
        v = self.g.probe_value(q_heads)
        if v is not None and np.ndim(v) == 4:
            return int(np.shape(v)[1])
        return None

    # -- gelu -----------------------------------------------------------------------------
    def activation(self, x: str) -> tuple[str, str]:
        """(kind, output name) of the activation between ``x`` and the next linear layer."""
        g = self.g
        ops, out = set(), None
        frontier, seen = [x], set()
        while frontier:
            t = frontier.pop()
            for c in g.cons.get(t, []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in ("MatMul", "Gemm") and g.const(c.input[1]) is not None:
                    out = t
                    continue
                ops.add(c.op_type)
                if c.op_type == "Gelu":
                    approx = _attr(c, "approximate", "none")
                    approx = approx.decode() if isinstance(approx, bytes) else approx
                    ops.add("tanh" if approx == "tanh" else "erf")
                frontier.extend(c.output)
        if out is None:
            raise _err(g.prod.get(x), "no linear layer after the activation")
        if "Erf" in ops or "erf" in ops:
            return "gelu_erf", out
        if "Tanh" in ops or "tanh" in ops:
            return "gelu_tanh", out
        raise _err(g.prod.get(x), f"unsupported activation made of {sorted(ops)} (GELU erf or tanh expected)")

    # -- embeddings -----------------------------------------------------------------------
    def embeddings(self, ln: S.LayerNorm) -> S.Embeddings:
        g = self.g
        gathers: list[onnx.NodeProto] = []
        stack = [ln.names["in"]]
        while stack:
            t = stack.pop()
            n = g.prod.get(t)
            if n is None:
                continue
            if n.op_type == "Add":
                stack.extend(n.input)
            elif n.op_type == "Gather" and g.const(n.input[0]) is not None:
                gathers.append(n)
        word = pos = tt = None
        ids_in = {k: k for k in g.inputs}
        for n in gathers:
            table = g.const(n.input[0])
            src = g.back(n.input[1])[0]
            if src == "input_ids" or (src in ids_in and "input" in src):
                word = table
            elif "token_type" in src or src == "token_type_ids":
                tt = table
            else:
                pos = table if pos is None else pos
        if word is None or pos is None:
            raise _err(g.prod.get(ln.names["in"]), "embeddings need word and position table Gathers")
        if tt is None and any("token_type" in n.input[0] for n in gathers):
            tt = next(g.const(n.input[0]) for n in gathers if "token_type" in n.input[0])
        return S.Embeddings(
            word.astype(np.float32),
            pos.astype(np.float32),
            None if tt is None else tt.astype(np.float32),
            ln,
            0,
            {S.ROLE_OUT: ln.names["in"]},
        )

    # -- whole model ----------------------------------------------------------------------
    def run(self) -> S.BertSpec:
        g = self.g
        unsupported = [
            n
            for n in g.nodes
            if n.op_type
            in (
                "Attention",
                "MultiHeadAttention",
                "EmbedLayerNormalization",
                "SkipLayerNormalization",
                "FastGelu",
                "BiasGelu",
                "QLinearMatMul",
                "MatMulInteger",
                "DequantizeLinear",
            )
        ]
        if unsupported:
            raise _err(unsupported[0], "fused or quantized op (export the float model without fusions)")
        softmaxes = [n for n in g.nodes if n.op_type == "Softmax"]
        if not softmaxes:
            raise _err(g.nodes[0] if g.nodes else None, "no Softmax: not a BERT encoder")
        first_ln = None
        layers = []
        x_in = None
        for i, sm in enumerate(softmaxes):
            # hidden size from the query weight
            att, out_name = self.attention(sm, 0)
            hidden = att.q.out_features
            if att.num_heads <= 0 or hidden % att.num_heads:
                raise _err(sm, f"{att.num_heads} heads do not divide hidden {hidden}")
            x = self.linear_input(att.q.names[S.ROLE_OUT])
            x = g.back(x)[0] if g.prod.get(x) is not None and g.prod[x].op_type in VIEW_OPS else x
            if i == 0:
                p = g.prod.get(x)
                if p is not None and p.op_type == "LayerNormalization":
                    first_ln = self.layernorm_after(p.input[0])
                else:
                    first_ln = self._ln_producing(x)
            res = [c for c in g.consumers(out_name, "Add")]
            if not res:
                raise _err(g.prod[out_name], "no residual Add after the attention output")
            ln1 = self.layernorm_after(res[0].output[0])
            inter_out = self.linear_consumer(ln1.names[S.ROLE_OUT])
            inter = self.linear_from_output(inter_out)
            act, act_out = self.activation(inter_out)
            ffn_out_name = self.linear_consumer(act_out)
            ffn_out = self.linear_from_output(ffn_out_name)
            res2 = g.consumers(ffn_out_name, "Add")
            if not res2:
                raise _err(g.prod[ffn_out_name], "no residual Add after the feed-forward output")
            ln2 = self.layernorm_after(res2[0].output[0])
            layers.append(S.EncoderLayer(att, ln1, inter, act, ffn_out, ln2, {S.ROLE_OUT: act_out}))
            x_in = ln2.names[S.ROLE_OUT]
        emb = self.embeddings(first_ln)
        pooler = classifier = None
        names: dict[str, str] = {}
        outputs: dict[str, str] = {}
        last = x_in
        for o in g.outputs:
            if g.back(o)[0] == last or o == last:
                outputs[o] = "last_hidden_state"
        tanh = next(
            (
                n
                for n in g.nodes
                if n.op_type == "Tanh"
                and g.prod.get(n.input[0]) is not None
                and g.prod[n.input[0]].op_type in ("Gemm", "Add")
            ),
            None,
        )
        if tanh is not None:
            pooler = self.linear_from_output(tanh.input[0])
            names["pooler_tanh"] = tanh.output[0]
            if tanh.output[0] in g.outputs:
                outputs[tanh.output[0]] = "pooler_output"
            try:
                cls_out = self.linear_consumer(tanh.output[0])
                classifier = self.linear_from_output(cls_out)
                for o in g.outputs:
                    if o == cls_out or g.back(o)[0] == cls_out:
                        outputs[o] = "logits"
            except UnsupportedGraphError:
                classifier = None
        if not outputs:
            raise _err(None, f"graph outputs {g.outputs} are neither the last hidden state, the pooler nor logits")
        roles = {}
        for r in ("input_ids", "attention_mask", "token_type_ids"):
            if r in g.inputs:
                roles[r] = r
        if "input_ids" not in roles:
            raise _err(None, f"graph inputs {g.inputs} lack input_ids")
        opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return S.BertSpec(emb, tuple(layers), pooler, classifier, roles, outputs, opset, g.model.producer_name, names)

    def _ln_producing(self, x: str) -> S.LayerNorm:
        """The decomposed LayerNorm whose output is ``x`` (the embedding LN)."""
        g = self.g
        n = g.prod.get(x)
        # walk back Add(beta) <- Mul(gamma) <- Div(d, sqrt) <- Sub(in, mean)
        seen = 0
        t = x
        while n is not None and seen < 6:
            if n.op_type == "Sub":
                return self.layernorm_after(n.input[0])
            t = next((i for i in n.input if g.const(i) is None), None)
            if t is None:
                break
            n = g.prod.get(t)
            seen += 1
        raise _err(g.prod.get(x), "no LayerNorm before the first attention")


def load_bert(model: str | Path | onnx.ModelProto, batch: int = 1, seq: int = 8) -> S.BertSpec:
    """Import an ONNX BERT (file path or ModelProto) as a float :class:`BertSpec`.

    ``batch``/``seq`` bind the dynamic axes while folding shape-derived constants.
    """
    m = load_onnx(model) if not isinstance(model, onnx.ModelProto) else model
    return _Importer(_Graph(m, batch, seq)).run()


def describe(spec: S.BertSpec) -> str:
    """One paragraph: layers, sizes, heads, activation, opset and the names found."""
    L = spec.layers
    ffn = L[0].intermediate.out_features if L else 0
    named = sum(
        len(lin.names)
        for layer in L
        for lin in (
            layer.attention.q,
            layer.attention.k,
            layer.attention.v,
            layer.attention.out,
            layer.intermediate,
            layer.output,
        )
    )
    return (
        f"BERT: {len(L)} layers, hidden {spec.hidden}, {spec.num_heads} heads, ffn {ffn}, "
        f"{L[0].activation if L else '-'}, vocab {spec.vocab_size}, opset {spec.opset}, "
        f"pooler {'yes' if spec.pooler is not None else 'no'}, classifier "
        f"{spec.classifier.out_features if spec.classifier is not None else 'no'}, "
        f"outputs {spec.outputs}, {named} named linear outputs"
    )
