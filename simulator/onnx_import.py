"""Import: recognise the BERT structure in an ONNX graph and return a float :class:`BertSpec`.

The importer anchors on the operators every BERT export keeps — ``Softmax`` for each
attention, ``MatMul``/``Gemm`` with a constant weight for each linear layer, ``Gather`` on
tables for the embeddings, ``LayerNormalization`` (or its ReduceMean/Sub/Pow/Sqrt/Div
decomposition) — and walks the dataflow between them through the view ops exporters put
in the way (Reshape, Transpose, Squeeze, Unsqueeze, Cast, Identity, Flatten).

Shape subgraphs (Shape/Gather/Concat/Range/Expand/ConstantOfShape/Slice/Equal/Where/IsNaN
chains) are never interpreted op by op. Everything numeric the structure needs from them
(an attention scale computed from a shape, the number of heads, the position ids, the
mask value) is folded by running the ORIGINAL graph once in onnxruntime on a probe batch
of concrete size (``batch`` x ``seq``, or small defaults when the axes are symbolic: the
spec holds weights, structure and names only, so it does not depend on the sizes). The
same probe checks what was recognised: the activation reproduces GELU on the probe
values, the pooler reads the [CLS] row of the last hidden state.

Every op of the graph must be in :data:`OPS` (op type -> the patterns it may take part
in); anything else, and any structure the patterns in :data:`PATTERNS` do not match, is an
:class:`~bbct.simulator.errors.UnsupportedGraphError` naming the node and its op type and
listing what is supported.

Tested on TorchScript (``dynamo=False``) exports at opsets 14 and 17 and dynamo exports at
opsets 18, 20 and 21; eager and SDPA attention; erf and tanh GELU; BertModel and
BertForSequenceClassification; with and without a token_type_ids input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner, load_onnx
from bbct.simulator import spec as S
from bbct.simulator.errors import UnsupportedGraphError

VIEW_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten")

# The registry: every op type the importer accepts, with the patterns it may take part in.
OPS: dict[str, str] = {
    "MatMul": "linear layer (constant weight), attention Q K^T and P V",
    "Gemm": "linear layer (pooler, classifier; transB=1 weights are transposed)",
    "Add": "bias, residual, embedding sum, additive attention mask, LayerNorm/GELU arithmetic",
    "Sub": "attention mask (1 - mask), LayerNorm centring",
    "Mul": "attention scale, mask value, LayerNorm gamma, GELU arithmetic",
    "Div": "attention scale (/ sqrt(d)), LayerNorm normalisation, GELU x / sqrt(2)",
    "Softmax": "attention probabilities (anchor of each attention)",
    "Gather": "embedding tables (word, position, token type), pooler [CLS] row, shape arithmetic",
    "LayerNormalization": "LayerNorm (fused)",
    "ReduceMean": "LayerNorm (decomposed)",
    "Pow": "LayerNorm variance (decomposed), tanh-GELU x^3",
    "Sqrt": "LayerNorm (decomposed), folded scales",
    "Erf": "GELU, erf form",
    "Tanh": "GELU, tanh approximation; pooler activation",
    "Gelu": "GELU op (opset 20), approximate none or tanh",
    "Slice": "pooler [CLS] row, position ids, shape arithmetic",
    "Where": "attention mask (boolean forms), NaN guard after Softmax",
    "IsNaN": "NaN guard after Softmax (SDPA exports)",
    **{op: "view between recognised values" for op in VIEW_OPS},
    **{
        op: "shape / constant subgraph (folded)"
        for op in (
            "Constant",
            "ConstantOfShape",
            "Shape",
            "Concat",
            "Range",
            "Expand",
            "Equal",
            "Not",
            "And",
            "Or",
            "Less",
            "LessOrEqual",
            "Greater",
            "GreaterOrEqual",
            "Max",
            "Min",
            "Neg",
            "Reciprocal",
            "GatherND",
            "GatherElements",
            "CumSum",
            "Size",
        )
    },
}


@dataclass(frozen=True)
class Pattern:
    """A recognised piece of BERT: what it matches, and the importer method that matches it."""

    matcher: str  # name of the _Importer method
    describes: str


# The registry of patterns, in the order they are matched; :meth:`_Importer.match` dispatches here.
PATTERNS: dict[str, Pattern] = {
    "inputs": Pattern(
        "input_roles", "graph inputs by the table they index: input_ids (word table), token_type_ids, attention_mask"
    ),
    "attention": Pattern(
        "attention",
        "Softmax anchored: MatMul(+Add) Q/K/V -> head Reshape/Transpose -> MatMul QK^T with Div by sqrt(d), "
        "Mul by 1/sqrt(d) or Mul by d**-0.25 on Q and K -> Add mask (Sub/Mul/Where forms, -10000 or float32 "
        "min) -> Softmax [-> IsNaN/Where] -> MatMul PV -> Transpose/Reshape -> output MatMul+Add",
    ),
    "linear": Pattern("linear_from_output", "MatMul(x, W) [+ Add(bias)], or Gemm (transB=1 weights transposed)"),
    "layernorm": Pattern(
        "layernorm_after",
        "residual Add -> LayerNormalization, or ReduceMean/Sub/Pow/ReduceMean/Add(eps)/Sqrt/Div/Mul/Add",
    ),
    "embedding layernorm": Pattern("layernorm_producing", "the LayerNorm that feeds the first attention"),
    "activation": Pattern(
        "activation", "GELU between the two feed-forward linears: Erf form, Gelu op, tanh approximation"
    ),
    "embeddings": Pattern(
        "embeddings", "Gather(word) + Gather(position) [+ Gather(token type)] -> Add -> embedding LayerNorm"
    ),
    "pooler": Pattern(
        "pooler", "Gather/Slice of the [CLS] row -> Gemm or MatMul+Add -> Tanh [-> classifier Gemm or MatMul+Add]"
    ),
}

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "QLinearMatMul",
    "MatMulInteger",
    "DequantizeLinear",
    "QuantizeLinear",
)

DEFAULT_PROBE_BATCH = 1
DEFAULT_PROBE_SEQ = 8


def supported() -> str:
    """The supported patterns and op types, one per line (the tail of every import error)."""
    pats = "\n".join(f"  {k}: {p.describes}" for k, p in PATTERNS.items())
    return f"Supported BERT structure:\n{pats}\n  ops: {', '.join(sorted(OPS))}"


def _err(node: onnx.NodeProto | None, what: str) -> UnsupportedGraphError:
    where = f"node {node.name or '(unnamed)'!r} ({node.op_type})" if node is not None else "graph"
    return UnsupportedGraphError(f"{where}: {what}.\n{supported()}")


def _attr(n: onnx.NodeProto, name: str, default):
    for a in n.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


class _Graph:
    """Producer/consumer maps, constants, and the once-only numeric probe of the graph."""

    def __init__(self, model: onnx.ModelProto, batch: int | None, seq: int | None, where: str) -> None:
        self.model = model
        self.where = where
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
        self.input_protos = [i for i in g.input if i.name not in self.inits]
        self.inputs = [i.name for i in self.input_protos]
        self.outputs = [o.name for o in g.output]
        self.batch, self.seq = batch, seq
        self.roles: dict[str, str] = {}  # role -> graph input, set before probing
        self.vocab = 1
        self._cache: dict[str, np.ndarray | None] = {}
        self._probe: dict[str, np.ndarray] | None = None

    # -- constants --------------------------------------------------------------------------
    def init(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def const(self, name: str) -> np.ndarray | None:
        """Value of a tensor that does not depend on the graph inputs, else None."""
        if name in self._cache:
            return self._cache[name]
        self._cache[name] = None  # guards cycles while folding
        v = self.init(name)
        n = self.prod.get(name)
        if v is None and n is not None:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        v = numpy_helper.to_array(a.t)
                    elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                        v = np.array(onnx.helper.get_attribute_value(a))
            elif n.op_type not in ("Shape", "Size") and all(self.const(i) is not None for i in n.input if i):
                v = self.probe_value(name)  # a constant-only subgraph: its value does not depend on sizes
        self._cache[name] = v
        return v

    def scalar(self, name: str) -> float | None:
        """A single-element value: folded constant, or the probe's value of a shape expression."""
        v = self.const(name)
        if v is None:
            v = self.probe_value(name)
        if v is None or np.size(v) != 1:
            return None
        return float(np.asarray(v).ravel()[0])

    # -- probe ------------------------------------------------------------------------------
    def probe_sizes(self) -> tuple[int, int]:
        """The bound (batch, seq): given, else the static dims of input_ids, else defaults."""
        ids = next((p for p in self.input_protos if p.name == self.roles.get("input_ids")), None)
        dims = [d.dim_value for d in ids.type.tensor_type.shape.dim] if ids is not None else []
        batch = self.batch or (dims[0] if len(dims) == 2 and dims[0] > 0 else DEFAULT_PROBE_BATCH)
        seq = self.seq or (dims[1] if len(dims) == 2 and dims[1] > 0 else DEFAULT_PROBE_SEQ)
        return batch, seq

    def probe_feeds(self) -> dict[str, np.ndarray]:
        b, s = self.probe_sizes()
        role_of = {v: k for k, v in self.roles.items()}
        feeds = {}
        for p in self.input_protos:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(p.type.tensor_type.elem_type)
            role = role_of.get(p.name)
            if role == "input_ids":  # distinct ids per position, so rows can be told apart
                v = (np.arange(b * s).reshape(b, s) * 7 + 1) % max(self.vocab, 1)
            elif role == "token_type_ids":
                v = np.zeros((b, s))
            else:
                v = np.ones((b, s))
            feeds[p.name] = v.astype(dtype)
        return feeds

    def probe_value(self, name: str) -> np.ndarray | None:
        """The tensor's value in one onnxruntime run of the original graph at the bound sizes."""
        if self._probe is None:
            try:
                self._probe = GoldenRunner(self.model).run_all(self.probe_feeds()).values
            except BbctError as e:
                b, s = self.probe_sizes()
                raise UnsupportedGraphError(
                    f"{self.where}: onnxruntime cannot run the graph at batch {b}, sequence {s} "
                    f"to fold its shape subgraphs: {e}"
                ) from None
        return self._probe.get(name)

    # -- walking ----------------------------------------------------------------------------
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


class _Importer:
    def __init__(self, g: _Graph) -> None:
        self.g = g

    def match(self, pattern: str, *args: Any) -> Any:
        """Run the matcher registered for ``pattern`` in :data:`PATTERNS`."""
        return getattr(self, PATTERNS[pattern].matcher)(*args)

    # -- registry check -----------------------------------------------------------------------
    def check_ops(self) -> None:
        for n in self.g.nodes:
            if n.domain not in ("", "ai.onnx"):
                raise _err(n, f"op of domain {n.domain!r} (only the standard ONNX domain is supported)")
            if n.op_type in FUSED_OPS:
                raise _err(n, "fused or quantized op: export the float model at opset <= 21 without fusions")
            if n.op_type not in OPS:
                raise _err(n, f"op {n.op_type} is not supported")

    # -- inputs ---------------------------------------------------------------------------------
    def input_roles(self) -> dict[str, str]:
        """Graph inputs by the embedding table they index (word table: the largest)."""
        g = self.g
        indexed: dict[str, int] = {}
        for n in g.nodes:
            if n.op_type == "Gather" and g.init(n.input[0]) is not None and g.inits[n.input[0]].dims.__len__() == 2:
                src = g.back(n.input[1])[0]
                if src in g.inputs:
                    indexed[src] = max(indexed.get(src, 0), int(g.inits[n.input[0]].dims[0]))
        if not indexed:
            raise _err(None, f"no graph input (of {g.inputs}) indexes an embedding table")
        by_rows = sorted(indexed, key=lambda k: -indexed[k])
        roles = {"input_ids": by_rows[0]}
        g.vocab = indexed[by_rows[0]]
        if len(by_rows) > 2:
            raise _err(None, f"graph inputs {by_rows} all index embedding tables (expected input_ids, token_type_ids)")
        if len(by_rows) == 2:
            roles["token_type_ids"] = by_rows[1]
        rest = [i for i in g.inputs if i not in indexed]
        if len(rest) > 1:
            raise _err(None, f"graph inputs {rest}: only one attention_mask input is supported")
        if rest:
            roles["attention_mask"] = rest[0]
        return roles

    # -- linear ---------------------------------------------------------------------------------
    def linear_from_output(self, out: str) -> S.Linear:
        """The Linear whose (bias-added) output tensor is ``out``."""
        g = self.g
        n = g.prod.get(out)
        if n is None:
            raise _err(None, f"tensor {out!r} has no producer where a linear layer was expected")
        if n.op_type == "Gemm":
            w = g.const(n.input[1])
            if w is None or w.ndim != 2:
                raise _err(n, "Gemm weight is not a 2-D constant")
            if _attr(n, "transB", 0):
                w = w.T
            b = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if _attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0 or _attr(n, "transA", 0):
                raise _err(n, "Gemm with alpha/beta != 1 or transA")
            if b is not None and b.size != w.shape[1]:
                raise _err(n, f"bias of {b.size} values does not match weight {w.shape}")
            bias = None if b is None else b.reshape(-1).astype(np.float32)
            return S.Linear(np.ascontiguousarray(w, np.float32), bias, {S.ROLE_OUT: out})
        bias, mm = None, n
        if n.op_type == "Add":
            for i, j in ((0, 1), (1, 0)):
                b, p = g.const(n.input[i]), g.prod.get(n.input[j])
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
        b32 = None if bias is None else bias.astype(np.float32)
        return S.Linear(np.ascontiguousarray(w, np.float32), b32, {S.ROLE_OUT: out})

    def linear_input(self, lin_out: str) -> str:
        n = self.g.prod[lin_out]
        if n.op_type == "Add":
            n = next(self.g.prod[i] for i in n.input if i in self.g.prod and self.g.prod[i].op_type == "MatMul")
        return n.input[0]

    def linear_consumer(self, x: str) -> str:
        """Output name of the linear layer that reads ``x`` (through view ops)."""
        g = self.g
        for c in g.cons.get(x, []):
            if c.op_type in ("Gemm", "MatMul") and c.input[0] == x and g.const(c.input[1]) is not None:
                if c.op_type == "MatMul":
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

    # -- layer norm -----------------------------------------------------------------------------
    def layernorm_after(self, x: str) -> S.LayerNorm:
        """The LayerNorm whose input is ``x``: fused op or the ReduceMean/Sub/.../Add decomposition."""
        g = self.g
        for c in g.consumers(x, "LayerNormalization"):
            gamma = g.const(c.input[1])
            beta = g.const(c.input[2]) if len(c.input) > 2 and c.input[2] else None
            if gamma is None or _attr(c, "axis", -1) != -1:
                raise _err(c, "LayerNormalization needs a constant scale and the last axis")
            beta = np.zeros_like(gamma) if beta is None else beta
            names = {S.ROLE_OUT: c.output[0], "in": x}
            return S.LayerNorm(
                gamma.astype(np.float32), beta.astype(np.float32), float(_attr(c, "epsilon", 1e-5)), names
            )
        for sub in g.consumers(x, "Sub"):
            mean = g.prod.get(sub.input[1])
            if sub.input[0] != x or mean is None or mean.op_type != "ReduceMean" or mean.input[0] != x:
                continue
            div = next(iter(g.consumers(sub.output[0], "Div")), None)
            sq = g.prod.get(div.input[1]) if div is not None else None
            add = g.prod.get(sq.input[0]) if sq is not None and sq.op_type == "Sqrt" else None
            if add is None or add.op_type != "Add":
                continue
            eps = next((g.scalar(i) for i in add.input if g.const(i) is not None), None)
            mul = g.consumers(div.output[0], "Mul")
            if eps is None or len(mul) != 1:
                continue
            gamma = next((g.const(i) for i in mul[0].input if g.const(i) is not None), None)
            addb = g.consumers(mul[0].output[0], "Add")
            beta = next((g.const(i) for i in addb[0].input if g.const(i) is not None), None) if addb else None
            if gamma is None:
                continue
            out = addb[0].output[0] if beta is not None else mul[0].output[0]
            beta = np.zeros_like(gamma) if beta is None else beta
            return S.LayerNorm(
                gamma.astype(np.float32), beta.astype(np.float32), float(eps), {S.ROLE_OUT: out, "in": x}
            )
        raise _err(g.prod.get(x), f"no LayerNorm (fused or decomposed) reads {x!r}")

    def layernorm_producing(self, x: str) -> S.LayerNorm:
        """The LayerNorm whose output is ``x`` (the embeddings' LayerNorm)."""
        g = self.g
        t = g.back(x)[0]
        n = g.prod.get(t)
        if n is not None and n.op_type == "LayerNormalization":
            return self.layernorm_after(n.input[0])
        for _ in range(6):  # Add(beta) <- Mul(gamma) <- Div <- Sub(x, ReduceMean(x))
            if n is None:
                break
            if n.op_type == "Sub":
                return self.layernorm_after(n.input[0])
            t = next((i for i in n.input if g.const(i) is None), None)
            n = g.prod.get(t) if t is not None else None
        raise _err(g.prod.get(x), "no LayerNorm before the first attention")

    # -- attention ------------------------------------------------------------------------------
    def scaled_source(self, t: str) -> tuple[str, float]:
        """Walk back through view ops and Mul/Div by scalars: (source tensor, product of scales).

        A scalar is a folded constant or a shape expression (``1 / sqrt(Shape(q)[-1])`` in SDPA
        decompositions), whose value is taken from the probe run.
        """
        g = self.g
        scale = 1.0
        while True:
            t, n = g.back(t)
            if n is None or n.op_type not in ("Mul", "Div"):
                return t, scale
            a, b = n.input
            c = g.scalar(b) if self._is_shape_expr(b) else None
            if c is not None and c != 0:
                scale, t = scale * (c if n.op_type == "Mul" else 1.0 / c), a
                continue
            c = g.scalar(a) if n.op_type == "Mul" and self._is_shape_expr(a) else None
            if c is not None:
                scale, t = scale * c, b
                continue
            return t, scale

    def _is_shape_expr(self, t: str) -> bool:
        """True when ``t`` is computed only from constants and Shape ops (a folded size)."""
        g = self.g
        seen, stack = set(), [t]
        while stack:
            x = stack.pop()
            if x in seen or g.const(x) is not None:
                continue
            seen.add(x)
            n = g.prod.get(x)
            if n is None:
                return False  # a graph input
            if n.op_type in ("Shape", "Size"):
                continue
            stack.extend(i for i in n.input if i)
        return True

    def mask_value(self, mask: str) -> float:
        """The additive value of a padded key: the most negative constant feeding the mask."""
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
            raise _err(g.prod.get(mask), "no large negative constant (-10000, float32 min, -inf) in the attention mask")
        v = min(neg)
        return float(np.finfo(np.float32).min) if not math.isfinite(v) else v

    def attention(self, sm: onnx.NodeProto) -> tuple[S.Attention, str]:
        g = self.g
        if _attr(sm, "axis", -1) not in (-1, 3):
            raise _err(sm, "Softmax over an axis other than the last")
        scores = sm.input[0]
        n = g.prod.get(scores)

        def is_scores(t: str) -> bool:  # leads back to a MatMul of two non-constant operands
            p = g.prod.get(self.scaled_source(t)[0])
            return p is not None and p.op_type == "MatMul" and g.const(p.input[1]) is None

        pre = scores
        if n is not None and n.op_type == "Add":
            a, b = n.input
            if is_scores(a):
                pre, mask_t = a, b
            elif is_scores(b):
                pre, mask_t = b, a
            else:
                raise _err(n, "cannot tell the scores from the mask at the Softmax input")
            mask_value = self.mask_value(mask_t)
        elif is_scores(scores):
            raise _err(sm, "attention without an additive mask is not supported")
        else:
            raise _err(n, "expected Add(scores, mask) before the Softmax")
        src, scale = self.scaled_source(pre)
        mm = g.prod[src]
        q_src, q_scale = self.scaled_source(mm.input[0])
        k_src, k_scale = self.scaled_source(mm.input[1])
        scale *= q_scale * k_scale
        probs = sm.output[0]
        pv = g.consumers(probs, "MatMul")
        if not pv:  # SDPA exports guard fully masked rows: Where(IsNaN(p), 0, p)
            for w in g.consumers(probs, "Where"):
                pv = g.consumers(w.output[0], "MatMul")
                if pv:
                    break
        if not pv or pv[0].input[0] not in (probs, *[w.output[0] for w in g.consumers(probs, "Where")]):
            raise _err(sm, "no MatMul(P, V) after the Softmax")
        v_src, v_scale = self.scaled_source(pv[0].input[1])
        if v_scale != 1.0:
            raise _err(pv[0], f"values scaled by {v_scale}")
        out_name = self.linear_consumer(g.fwd(pv[0].output[0]))
        q, k, v = (self.linear_from_output(t) for t in (q_src, k_src, v_src))
        out = self.linear_from_output(out_name)
        heads_v = g.probe_value(mm.input[0])
        if heads_v is None or np.ndim(heads_v) != 4:
            raise _err(mm, "cannot determine the number of heads (Q is not 4-D)")
        heads = int(np.shape(heads_v)[1])
        if heads <= 0 or q.out_features % heads:
            raise _err(mm, f"{heads} heads do not divide hidden {q.out_features}")
        names = {S.ROLE_SCORES: scores, S.ROLE_PROBS: probs, S.ROLE_CONTEXT: self.linear_input(out_name)}
        return S.Attention(q, k, v, out, heads, float(scale), float(mask_value), names), out_name

    # -- gelu -----------------------------------------------------------------------------------
    def activation(self, x: str) -> tuple[str, str]:
        """(kind, output name) of the activation between ``x`` and the next linear layer."""
        g = self.g
        ops: set[str] = set()
        out, frontier, seen = None, [x], set()
        while frontier:
            t = frontier.pop()
            for c in g.cons.get(t, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op_type in ("MatMul", "Gemm") and g.const(c.input[1]) is not None:
                    if out is not None and out != t:
                        raise _err(c, "two linear layers read the activation")
                    out = t
                    continue
                ops.add(c.op_type)
                if c.op_type == "Gelu":
                    ops.add("Tanh" if _attr(c, "approximate", "none") == "tanh" else "Erf")
                frontier.extend(c.output)
        if out is None:
            raise _err(g.prod.get(x), "no linear layer after the activation")
        odd = sorted(ops - {"Mul", "Div", "Add", "Pow", "Erf", "Tanh", "Gelu", "Cast", "Constant"})
        if odd or ("Erf" in ops) == ("Tanh" in ops):
            raise _err(g.prod.get(out), f"activation made of {sorted(ops)} is not GELU (erf or tanh form)")
        kind = "gelu_erf" if "Erf" in ops else "gelu_tanh"
        xv, yv = g.probe_value(x), g.probe_value(out)
        if xv is None or yv is None or xv.shape != yv.shape:
            raise _err(g.prod.get(out), "activation input and output differ in shape")
        from bbct.simulator.float_model import gelu

        want = gelu(xv.astype(np.float64), kind)
        if np.abs(want - yv).max() > 1e-5 * (1 + np.abs(want).max()):
            raise _err(g.prod.get(out), f"activation output {out!r} is not {kind} of {x!r} on the probe batch")
        return kind, out

    # -- embeddings -----------------------------------------------------------------------------
    def embeddings(self, ln: S.LayerNorm) -> S.Embeddings:
        g = self.g
        gathers: list[onnx.NodeProto] = []
        stack = [ln.names["in"]]
        while stack:
            t = stack.pop()
            n = g.prod.get(t)
            if n is not None and n.op_type == "Add":
                stack.extend(n.input)
            elif n is not None and n.op_type == "Gather" and g.init(n.input[0]) is not None:
                gathers.append(n)
            elif n is not None and n.op_type in VIEW_OPS:
                stack.append(n.input[0])
            else:
                raise _err(n, "embeddings sum a term that is not a table Gather")
        word = pos = tt = None
        offset = 0
        for n in gathers:
            table = g.init(n.input[0])
            src = g.back(n.input[1])[0]
            if src == g.roles["input_ids"]:
                word = table
            elif src == g.roles.get("token_type_ids"):
                tt = table
            else:
                idx = g.probe_value(n.input[1])
                b, s = g.probe_sizes()
                rows = np.asarray(idx).reshape(-1, np.shape(idx)[-1]) if idx is not None else None
                if rows is not None and rows.shape[-1] == s and (rows == rows[0, 0] + np.arange(s)).all() and s > 1:
                    pos, offset = table, int(rows[0, 0])
                elif rows is not None and (rows == 0).all() and tt is None and (s > 1 or pos is not None):
                    tt = table[:1]  # a buffered token type 0: row 0 is added everywhere
                elif rows is not None and pos is None and s == 1:
                    pos, offset = table, int(rows[0, 0])
                else:
                    raise _err(n, "Gather on a table whose indices are neither an input nor position ids")
        if word is None or pos is None:
            raise _err(g.prod.get(ln.names["in"]), "embeddings need word and position table Gathers")
        tt = None if tt is None else tt.astype(np.float32)
        return S.Embeddings(
            word.astype(np.float32), pos.astype(np.float32), tt, ln, offset, {S.ROLE_OUT: ln.names["in"]}
        )

    # -- pooler and head ------------------------------------------------------------------------
    def pooler(self, last: str) -> tuple[S.Linear | None, S.Linear | None, dict[str, str]]:
        g = self.g
        for tanh in (n for n in g.nodes if n.op_type == "Tanh"):
            p = g.prod.get(tanh.input[0])
            if p is None or p.op_type not in ("Gemm", "Add") or g.back(tanh.input[0])[0] != tanh.input[0]:
                continue
            try:
                pooler = self.linear_from_output(tanh.input[0])
            except UnsupportedGraphError:
                continue
            cls_in = g.probe_value(self.linear_input(tanh.input[0]))
            hidden = g.probe_value(last)
            if cls_in is None or hidden is None or not np.array_equal(cls_in.reshape(hidden[:, 0].shape), hidden[:, 0]):
                raise _err(tanh, "the pooler does not read the [CLS] row of the last hidden state")
            classifier = None
            reader = [c for c in g.cons.get(tanh.output[0], [])]
            if reader:
                classifier = self.linear_from_output(self.linear_consumer(tanh.output[0]))
            return pooler, classifier, {"pooler_tanh": tanh.output[0]}
        return None, None, {}

    # -- whole model ----------------------------------------------------------------------------
    def run(self) -> S.BertSpec:
        g = self.g
        self.check_ops()
        g.roles = self.match("inputs")
        softmaxes = [n for n in g.nodes if n.op_type == "Softmax"]
        if not softmaxes:
            raise _err(None, "no Softmax: not a BERT encoder")
        layers: list[S.EncoderLayer] = []
        first_ln = None
        x_in = None
        for sm in softmaxes:
            att, out_name = self.match("attention", sm)
            x = self.linear_input(att.q.names[S.ROLE_OUT])
            x = g.back(x)[0]
            if first_ln is None:
                first_ln = self.match("embedding layernorm", x)
            elif x != x_in:
                raise _err(sm, "attention does not read the previous layer's output")
            res = g.consumers(out_name, "Add")
            if len(res) != 1 or g.back([i for i in res[0].input if i != out_name][0])[0] != x:
                raise _err(g.prod[out_name], "no residual Add(attention output, layer input)")
            ln1 = self.match("layernorm", res[0].output[0])
            inter_out = self.linear_consumer(ln1.names[S.ROLE_OUT])
            inter = self.match("linear", inter_out)
            act, act_out = self.match("activation", inter_out)
            ffn_name = self.linear_consumer(act_out)
            ffn = self.match("linear", ffn_name)
            res2 = g.consumers(ffn_name, "Add")
            if len(res2) != 1 or g.back([i for i in res2[0].input if i != ffn_name][0])[0] != ln1.names[S.ROLE_OUT]:
                raise _err(g.prod[ffn_name], "no residual Add(feed-forward output, attention LayerNorm output)")
            ln2 = self.match("layernorm", res2[0].output[0])
            layers.append(S.EncoderLayer(att, ln1, inter, act, ffn, ln2, {S.ROLE_OUT: act_out}))
            x_in = ln2.names[S.ROLE_OUT]
        emb = self.match("embeddings", first_ln)
        pooler, classifier, names = self.match("pooler", x_in)
        outputs: dict[str, str] = {}
        by_tensor = {x_in: "last_hidden_state", names.get("pooler_tanh"): "pooler_output"}
        if classifier is not None:
            by_tensor[classifier.names[S.ROLE_OUT]] = "logits"
        for o in g.outputs:
            role = by_tensor.get(o) or by_tensor.get(g.back(o)[0])
            if role is None:
                raise _err(g.prod.get(o), f"graph output {o!r} is neither the last hidden state, the pooler nor logits")
            outputs[o] = role
        opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return S.BertSpec(
            emb, tuple(layers), pooler, classifier, dict(g.roles), outputs, opset, g.model.producer_name, names
        )


def _check_size(what: str, v: int | None) -> int | None:
    if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
        raise BbctError(f"{what} must be a positive integer or None, got {v!r}")
    return None if v is None else int(v)


def load_bert(
    path_or_model: str | Path | onnx.ModelProto, batch: int | None = None, seq: int | None = None
) -> S.BertSpec:
    """Import an ONNX BERT (file path or ModelProto) as a float :class:`BertSpec`.

    ``batch``/``seq`` bind the symbolic batch and sequence axes for the probe run that folds
    shape subgraphs; left None, the static sizes of ``input_ids`` or 1 x 8 are used (the
    spec does not depend on them). A missing file, a file that is not ONNX, a model that
    fails the ONNX checker or a graph that is not a supported BERT is a
    :class:`~bbct.golden.errors.BbctError` naming the path and, for a graph, the node at fault.
    """
    batch, seq = _check_size("batch", batch), _check_size("seq", seq)
    if isinstance(path_or_model, onnx.ModelProto):
        m, where = path_or_model, f"model {path_or_model.graph.name or '(unnamed graph)'}"
    else:
        m, where = load_onnx(path_or_model), str(path_or_model)
    try:
        onnx.checker.check_model(m)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise BbctError(f"{where}: malformed ONNX model: {str(e).splitlines()[0]}") from None
    try:
        return _Importer(_Graph(m, batch, seq, where)).run()
    except UnsupportedGraphError as e:
        msg = str(e)
        raise UnsupportedGraphError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def describe(spec: S.BertSpec) -> str:
    """A short summary: layers, sizes, heads, activation, opset, inputs/outputs and names found."""
    L = spec.layers
    a0 = L[0].attention if L else None
    ffn = L[0].intermediate.out_features if L else 0
    records: list = [spec.embeddings, spec.embeddings.layer_norm, spec.pooler, spec.classifier]
    for layer in L:
        at = layer.attention
        records += [at, at.q, at.k, at.v, at.out, layer, layer.intermediate, layer.output]
        records += [layer.attention_norm, layer.output_norm]
    named = sum(len([k for k in r.names if k != "in"]) for r in records if r is not None) + len(spec.names)
    lines = [
        f"BERT: {len(L)} layers, hidden {spec.hidden}, {spec.num_heads} heads, ffn {ffn}, "
        f"{L[0].activation if L else '-'}, vocab {spec.vocab_size}, "
        f"max positions {spec.embeddings.position.shape[0]}",
        f"attention scale {a0.scale:.6g}, mask value {a0.mask_value:.6g}, LayerNorm eps {L[0].attention_norm.eps:.3g}"
        if a0 is not None
        else "no attention",
        f"pooler {'yes' if spec.pooler is not None else 'no'}, classifier "
        f"{spec.classifier.out_features if spec.classifier is not None else 'no'} labels",
        f"opset {spec.opset}, producer {spec.producer or '?'}, inputs {spec.inputs}, outputs {spec.outputs}",
        f"{named} named tensors",
    ]
    return "\n".join(lines)
