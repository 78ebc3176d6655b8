"""ONNX -> :class:`FGraph`, op by op, then the pattern passes.

1. **Classify** every tensor: *constant* (initializers, ``Constant`` and whatever only they
   feed), *index* (depends on the integer graph inputs and on sizes only: ids, positions,
   masks, shapes) or *activation* (a float value downstream of an embedding lookup). A
   ``Shape`` of an activation is index: encoder activations are ``(batch, seq, ...)``, so it is
   rewritten as the shape of ``input_ids`` plus constant trailing sizes (checked on two probes).
2. **Probe**: onnxruntime runs the original graph twice, at two sizes with different ids and
   masks, every intermediate exposed (shorter sequences when the graph cannot take 7 tokens,
   e.g. a position table of 4 rows). Computed constants take the probe's value; an index
   tensor the activations read that is the same in both probes (an attention scale computed
   from a head size) is a constant; the others are *computed at run time* by the index
   subgraph (:class:`IndexGraph`), for any size, exactly as the graph computes them.
3. **Handlers**: each activation op becomes a node through the registry :data:`HANDLERS`
   (``Gather`` of a table -> :class:`Embedding`; the rest -> :class:`OnnxOp`, to be fused).
   An op with no handler is an error naming the node and the op.
4. **Patterns** (:mod:`bbct.simulator.frontend.patterns`) fuse the ops into typed nodes; an
   :class:`OnnxOp` left over is an error naming the node, the op and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bbct.golden.errors import BbctError
from bbct.golden.runner import GoldenRunner, checkable, detach_weights, load_onnx
from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.frontend import fgraph as F

CONST, INDEX, ACT = "const", "index", "act"
ROLES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
PROBES = ((2, 5, 0), (3, 7, 1))  # (batch, seq, seed): distinct sizes so batch and seq can be told apart
SHORT_PROBES = ((2, 3, 0), (3, 4, 1))  # for a model with fewer than 7 positions (its own limit is checked at run)

QUANTIZED_OPS = (
    "MatMulInteger",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "QAttention",
)


@dataclass(frozen=True)
class Handler:
    fn: Callable[..., F.FNode]
    describes: str


HANDLERS: dict[str, Handler] = {}


def handler(*op_types: str, describes: str = "") -> Callable:
    """Register the function that turns an activation-path ONNX op into a float-graph node."""

    def deco(fn: Callable[..., F.FNode]) -> Callable[..., F.FNode]:
        for t in op_types:
            HANDLERS[t] = Handler(fn, describes)
        return fn

    return deco


def _attrs(n: onnx.NodeProto) -> dict:
    out = {}
    for a in n.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list):
            v = tuple(x.decode() if isinstance(x, bytes) else x for x in v)
        out[a.name] = v
    return out


def _generic(imp: _Importer, n: onnx.NodeProto) -> F.FNode:
    names, positions, consts, const_names = [], [], {}, {}
    for pos, t in enumerate(n.input):
        if not t:
            continue
        if imp.kind[t] == ACT or (imp.kind[t] == INDEX and t not in imp.folded):
            names.append(t)
            positions.append(pos)
        else:
            consts[pos] = imp.value(t)
            const_names[pos] = t
    return F.OnnxOp(
        name=n.output[0],
        inputs=tuple(names),
        sources=(n.name or n.output[0],),
        op_type=n.op_type,
        attributes=_attrs(n),
        consts=consts,
        const_names=const_names,
        positions=tuple(positions),
    )


ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Relu", "Neg", "Reciprocal", "Max", "Clip")
for _t, _d in (
    ("MatMul", "linear layers (constant weight), attention Q K^T and P V"),
    ("Gemm", "linear layers (transB handled)"),
    ("Softmax", "attention probabilities"),
    ("LayerNormalization", "LayerNorm (fused)"),
    ("ReduceMean", "LayerNorm (decomposed)"),
    ("ReduceSum", "mean pooling, L2 norm"),
    ("ReduceL2", "L2 norm"),
    ("Gelu", "GELU (opset 20)"),
    ("Where", "attention mask (masked_fill), NaN guard after Softmax"),
    ("IsNaN", "NaN guard after Softmax"),
    ("Slice", "taking the first token"),
    ("Reshape", "head split and merge"),
    ("Transpose", "head split and merge"),
    ("Squeeze", "views"),
    ("Unsqueeze", "views"),
    ("Expand", "broadcast of a norm (L2 normalize)"),
    ("Identity", "views (removed)"),
    ("Dropout", "inference no-op (removed)"),
    ("Cast", "float-to-float casts (removed)"),
    ("Flatten", "views"),
    ("QuantizeLinear", "given activation quantization (with its DequantizeLinear)"),
    ("DequantizeLinear", "given activation quantization; a constant's (weights) is read as its codes"),
    ("DynamicQuantizeLinear", "run-time activation quantization (quantize_dynamic; MatMulInteger rewritten to QDQ)"),
    *((t, "element-wise arithmetic of a fused pattern") for t in ELEMENTWISE),
):
    HANDLERS[_t] = Handler(_generic, _d)


@handler("Gather", describes="embedding lookups (constant table, index tensor); taking the first token")
def _gather(imp: _Importer, n: onnx.NodeProto) -> F.FNode:
    data, idx = n.input[0], n.input[1]
    if imp.kind[data] == CONST and imp.kind[idx] == INDEX:
        table = imp.value(data)
        if table.ndim != 2 or table.dtype.kind != "f" or _attrs(n).get("axis", 0) != 0:
            raise UnsupportedGraphError(f"node {n.name!r} (Gather): a lookup in a table that is not a 2-D float matrix")
        if idx in imp.folded:
            raise UnsupportedGraphError(f"node {n.name!r} (Gather): table lookup by constant indices")
        given = imp.given(data)
        if given is not None and not (
            given.codes.shape == table.shape and np.array_equal(given.dequantize(), table.astype(np.float32))
        ):
            given = None  # not the stored codes' plain dequantization: the table's float values
        return F.Embedding(
            name=n.output[0],
            inputs=(idx,),
            sources=(n.name,),
            table=np.asarray(table, np.float32),  # a float32 table as it is (no second copy of the largest weight)
            table_name=data,
            given=given,
        )
    return _generic(imp, n)


def qrange(dtype: np.dtype | str) -> tuple[int, int]:
    """Code range of an ONNX quantized type (int4/uint4 come as ml_dtypes from onnx)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    bits = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32}.get(name)
    if bits is None:
        raise UnsupportedGraphError(f"quantized type {name} is not supported (int4/8/16, uint4/8/16, int32)")
    if name.startswith("u"):
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def given_quant(n: onnx.NodeProto, scale: np.ndarray, zp: np.ndarray | None, codes: np.ndarray | None) -> F.GivenQuant:
    """The parameters of a QuantizeLinear/DequantizeLinear node (``zp`` None: 0 of uint8,
    or of ``codes``' type). Blocked scales (``block_size``) are read for stored codes (a
    weight) and refused, naming the node, for an activation."""
    a = _attrs(n)
    block = int(a.get("block_size", 0))
    if block and codes is None:
        raise UnsupportedGraphError(
            f"node {n.name!r} ({n.op_type}): blocked scales (block_size={block}) on an activation are not supported"
        )
    scale = np.asarray(scale)
    if block:
        ax = int(a.get("axis", 1)) % max(1, np.ndim(codes))
        want = list(np.shape(codes))
        want[ax] = -(-want[ax] // block) if want else 0
        if list(scale.shape) != want or (zp is not None and np.shape(zp) != scale.shape):
            raise UnsupportedGraphError(
                f"node {n.name!r} ({n.op_type}): blocked scales of shape {list(scale.shape)} for codes "
                f"{list(np.shape(codes))}, block_size={block} along axis {ax}: expected {want}"
            )
    if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or np.any(scale <= 0 if codes is None else scale == 0):
        raise UnsupportedGraphError(
            f"node {n.name!r} ({n.op_type}): scale must be "
            + ("positive and finite" if codes is None else "finite and nonzero (a weight's may be negative)")
        )
    dtype = zp.dtype if zp is not None else (codes.dtype if codes is not None else np.dtype(np.uint8))
    if "output_dtype" in a and zp is None:
        dtype = helper.tensor_dtype_to_np_dtype(a["output_dtype"])
    qmin, qmax = qrange(dtype)
    z = np.zeros(scale.shape, np.int64) if zp is None else np.asarray(zp).astype(np.int64)
    axis = int(a.get("axis", 1)) if scale.ndim else None
    if axis is not None and codes is not None:
        axis %= np.ndim(codes)
    return F.GivenQuant(
        scale=scale.astype(np.float32),
        zero_point=z,
        qmin=qmin,
        qmax=qmax,
        axis=axis,
        codes=None if codes is None else np.asarray(codes).astype(np.int64),
        source=n.name or n.output[0],
        block_size=block,
    )


def supported_ops() -> dict[str, str]:
    """ONNX op type -> what it is accepted for on the activation path."""
    return {k: h.describes for k, h in sorted(HANDLERS.items())}


class _Importer:
    def __init__(self, model: onnx.ModelProto, where: str, weights: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.where = where
        self.weights = weights or {}  # detached initializers' values (golden.runner.detach_weights)
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.graph_inputs = [i for i in g.input if i.name not in self.inits]
        self.prod = {o: n for n in self.nodes for o in n.output}
        self.kind: dict[str, str] = {}
        self.folded: dict[str, np.ndarray] = {}  # constants and size-invariant index tensors
        self.probe: list[dict[str, np.ndarray]] = []
        self.probe_feeds: list[dict[str, np.ndarray]] = []
        self.roles: dict[str, str] = {}
        self.tables: dict[str, int] = {}  # graph input -> rows of the largest table it indexes
        self._inferred: dict[str, tuple[int, ...]] | None = None
        self.probes = PROBES
        self.quant_notes: dict[str, str] = {}  # given activation quantization not honoured -> why
        # tensor -> (its given quantization, the ONNX node computing the tensor): lowering
        # quantizes the value of the node of that name to the given codes (qdq.honour_output)
        self.given_acts: dict[str, tuple[F.GivenQuant, str]] = {}
        self.given_exact: dict[str, str] = {}  # Q/DQ pairs that are the identity on codes moved unchanged -> why

    def given(self, t: str) -> F.GivenQuant | None:
        """The stored codes and parameters of constant ``t`` when a DequantizeLinear of
        initializers computes it (a quantized weight or table), else None."""
        n = self.prod.get(t)
        if n is None or n.op_type != "DequantizeLinear" or self.kind.get(t) != CONST:
            return None
        vals = [self.value(i) if i else None for i in list(n.input) + [""] * (3 - len(n.input))]
        return given_quant(n, vals[1], vals[2], vals[0])

    # -- step 1 ---------------------------------------------------------------------------------
    def check_ops(self) -> None:
        for n in self.nodes:
            if n.domain == "com.microsoft" and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue  # onnxruntime's twins of the standard ops (its quantizer writes them for 4/16 bits)
            if n.domain not in ("", "ai.onnx"):
                raise UnsupportedGraphError(
                    f"node {n.name!r} ({n.op_type}): op of domain {n.domain!r}; only the standard ONNX domain "
                    "is supported (export without onnxruntime fusions)"
                )
            if n.op_type in QUANTIZED_OPS:
                raise UnsupportedGraphError(
                    f"node {n.name!r} ({n.op_type}): this quantized op is supported only as onnxruntime's quantizer "
                    "arranges it (QDQ pairs, quantize_dynamic, QOperator); give the float model or a QDQ one"
                )

    def classify(self) -> None:
        for i in self.inits:
            self.kind[i] = CONST
        for i in self.graph_inputs:
            self.kind[i.name] = INDEX
        for n in self.nodes:
            ins = [self.kind.get(t, CONST) for t in n.input if t]
            if n.op_type == "Constant" or not ins or all(k == CONST for k in ins):
                k = CONST
            elif n.op_type in ("Shape", "Size"):
                k = INDEX
            elif n.op_type == "Gather" and ins[0] == CONST and ins[1] == INDEX and self._is_float_table(n.input[0]):
                k = ACT
            elif ACT in ins:
                k = ACT
            else:
                k = INDEX
            for o in n.output:
                self.kind[o] = k

    def _is_float_table(self, t: str) -> bool:
        if t in self.inits:
            init = self.inits[t]
            return len(init.dims) == 2 and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, 10, 16)
        return True  # a computed constant (e.g. dequantized int8 table): checked on its value

    def assign_roles(self) -> None:
        """Graph inputs by name when standard, else by structure (the largest table: input_ids)."""
        reach: dict[str, set[str]] = {}  # tensor -> graph inputs it depends on
        for i in self.graph_inputs:
            reach[i.name] = {i.name}
        for n in self.nodes:
            dep = set().union(*(reach.get(t, set()) for t in n.input if t and self.kind.get(t) == INDEX))
            if n.op_type in ("Shape", "Size"):
                dep = set()  # a size, not the values: position ids sliced by Shape(token_type_ids)
            for o in n.output:
                reach[o] = dep
            if n.op_type == "Gather" and self.kind.get(n.output[0]) == ACT:
                rows = self._const_shape(n.input[0])[0]
                for src in reach.get(n.input[1], set()):
                    self.tables[src] = max(self.tables.get(src, 0), rows)
        names = [i.name for i in self.graph_inputs]
        roles: dict[str, str] = {}
        for nm in names:
            if nm in ROLES:
                roles[nm] = nm
        free = [nm for nm in names if nm not in roles]
        if "input_ids" not in roles.values():
            cands = sorted((nm for nm in free if nm in self.tables), key=lambda k: -self.tables[k])
            if not cands:
                raise UnsupportedGraphError(f"no graph input (of {names}) indexes an embedding table")
            roles[cands[0]] = "input_ids"
            free.remove(cands[0])
        for nm in list(free):
            if nm in self.tables and "token_type_ids" not in roles.values():
                roles[nm] = "token_type_ids"
                free.remove(nm)
        for nm in list(free):
            if "attention_mask" not in roles.values():
                roles[nm] = "attention_mask"
                free.remove(nm)
        if free:
            raise UnsupportedGraphError(f"graph inputs {free}: no role (input_ids, attention_mask, token_type_ids)")
        self.roles = roles

    def _const_shape(self, t: str) -> tuple[int, ...]:
        """Shape of a constant: an initializer's dims, else (a table computed from initializers,
        e.g. int8 codes Cast and scaled) ONNX shape inference, else the probe's value."""
        if t in self.inits:
            return tuple(self.inits[t].dims)
        if self.probe:
            return tuple(np.shape(self.probe[0][t]))
        if self._inferred is None:
            try:
                g = onnx.shape_inference.infer_shapes(self.model).graph
                self._inferred = {
                    v.name: tuple(d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim)
                    for v in g.value_info
                }
            except Exception:  # shape inference is a convenience here: the probes check the roles
                self._inferred = {}
        return self._inferred.get(t, (0, 0))

    def check_outputs(self) -> None:
        """Every graph output must come from the token embeddings (before any probe runs)."""
        for o in self.model.graph.output:
            if self.kind.get(o.name) != ACT:
                raise UnsupportedGraphError(
                    f"graph output {o.name!r} does not depend on an embedding lookup (a Gather of a float table "
                    "by the token ids): not an encoder of the BERT family"
                )

    def check_finite(self, computed: bool) -> None:
        """The float constants the activation path reads (weights, biases, LayerNorm gamma and
        beta, tables) must be finite: a NaN anywhere, or an infinity in a constant of more than
        one element, is refused naming the initializer and the node. A single infinite value is
        a fill value (an attention mask's -inf, a Clip bound), which the patterns handle.
        ``computed``: also the constants computed by the graph (known after the probes)."""
        seen: set[str] = set()
        for n in self.nodes:
            if self.kind.get(n.output[0]) != ACT:
                continue
            for t in n.input:
                if not t or t in seen or self.kind.get(t) != CONST:
                    continue
                prod = self.prod.get(t)
                stored = t in self.inits or (prod is not None and prod.op_type == "Constant")
                if not stored and not computed:
                    continue
                seen.add(t)
                v = np.asarray(self.value(t))
                if v.dtype.kind != "f" or not v.size:
                    continue
                bad = np.isnan(v) if v.size == 1 else ~np.isfinite(v)
                if bad.any():
                    idx = tuple(int(i) for i in np.argwhere(bad)[0]) if v.ndim else ()
                    what = "initializer" if t in self.inits else ("constant" if stored else "computed constant")
                    raise UnsupportedGraphError(
                        f"node {n.name or n.output[0]!r} ({n.op_type}): {what} {t!r} holds {v[idx]} "
                        f"at {list(idx)} ({int(bad.sum())} non-finite of {v.size}); a model with non-finite "
                        "weights cannot be simulated"
                    )

    def check_probe_overflow(self) -> None:
        """A NaN or +inf activation on a probe: the float model overflows (huge weights), which
        is the error to report, not the pattern it made fail (-inf is a mask's fill value)."""
        for n in self.nodes:
            for t in n.output:
                v = self.probe[0].get(t) if t and self.kind.get(t) == ACT else None
                if v is None or np.asarray(v).dtype.kind != "f":
                    continue
                bad = np.isnan(v) | np.isposinf(v)
                if bad.any():
                    idx = [int(i) for i in np.argwhere(bad)[0]]
                    raise UnsupportedGraphError(
                        f"node {n.name or t!r} ({n.op_type}): the float model overflows, its output {t!r} holds "
                        f"{np.asarray(v)[tuple(idx)]} at {idx} on an import probe (weights too large for float32)"
                    )

    # -- step 2 ---------------------------------------------------------------------------------
    def make_feeds(self, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {}
        for p in self.graph_inputs:
            dtype = helper.tensor_dtype_to_np_dtype(p.type.tensor_type.elem_type)
            role = self.roles[p.name]
            if role == "input_ids":
                v = rng.integers(3, max(4, self.tables.get(p.name, 4)), (batch, seq))
            elif role == "token_type_ids":
                v = rng.integers(0, max(1, self.tables.get(p.name, 1)), (batch, seq))
            elif role == "position_ids":
                v = np.broadcast_to(np.arange(seq), (batch, seq))
            else:  # attention mask: row b keeps seq - b tokens (right padding), the last row all
                v = np.ones((batch, seq))
                for b in range(batch - 1):
                    v[b, seq - 1 - b :] = 0
            feeds[p.name] = np.ascontiguousarray(v).astype(dtype)
        return feeds

    def run_probes(self) -> None:
        runner = GoldenRunner(self.model, weights=self.weights)
        error = ""
        for probes in (PROBES, SHORT_PROBES):
            self.probe, self.probe_feeds = [], []
            try:
                for batch, seq, seed in probes:
                    feeds = self.make_feeds(batch, seq, seed)
                    self.probe_feeds.append(feeds)
                    self.probe.append({**runner.run_all(feeds).values, **feeds})
            except BbctError as e:  # onnxruntime's own failure, one line naming the node
                error = error or f"import probe: {e}"
                continue
            self.probes = probes
            return
        raise UnsupportedGraphError(error)

    def value(self, t: str) -> np.ndarray:
        if t in self.folded:
            return self.folded[t]
        if t in self.weights:
            v = self.weights[t]
        elif t in self.inits:
            v = numpy_helper.to_array(self.inits[t])
        else:
            n = self.prod.get(t)
            v = None
            if n is not None and n.op_type == "Constant":
                a = _attrs(n)
                for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
                    if key in a:
                        v = np.asarray(a[key])
            if v is None:
                v = np.asarray(self.probe[0][t])
        self.folded[t] = v
        return v

    def fold_invariant_index(self) -> None:
        """Index tensors read by activation ops that are equal on both probes are constants."""
        for n in self.nodes:
            if self.kind.get(n.output[0]) != ACT:
                continue
            for t in n.input:
                if t and self.kind.get(t) == INDEX and t not in self.folded and t not in self.roles:
                    a, b = self.probe[0].get(t), self.probe[1].get(t)
                    if a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b):
                        self.folded[t] = np.asarray(a)

    # -- step 3 ---------------------------------------------------------------------------------
    def act_nodes(self) -> list[F.FNode]:
        out: list[F.FNode] = []
        for n in self.nodes:
            if self.kind.get(n.output[0]) != ACT:
                continue
            h = HANDLERS.get(n.op_type)
            if h is None:
                raise UnsupportedGraphError(
                    f"node {n.name!r} ({n.op_type}): op {n.op_type} is not supported on the activation path "
                    "(`bbct ops` lists what is)"
                )
            for extra in n.output[1:] if n.op_type != "DynamicQuantizeLinear" else ():
                if (
                    extra
                    and any(extra in m.input for m in self.nodes)
                    or extra in [o.name for o in self.model.graph.output]
                ):
                    raise UnsupportedGraphError(f"node {n.name!r} ({n.op_type}): its output {extra!r} is used")
            out.append(h.fn(self, n))
        return out

    # -- index subgraph -------------------------------------------------------------------------
    def index_graph(self, outputs: list[str]) -> F.IndexGraph:
        """The subgraph from the graph inputs to ``outputs``, with every Shape of an activation
        replaced by the shape of input_ids plus constant trailing sizes; checked on the probes."""
        if not outputs:
            return F.IndexGraph(b"", (), ())
        ids = next(k for k, v in self.roles.items() if v == "input_ids")
        nodes: list[onnx.NodeProto] = []
        needed, stack = set(), list(outputs)
        while stack:
            t = stack.pop()
            if t in needed:
                continue
            needed.add(t)
            n = self.prod.get(t)
            if n is None or (n.op_type in ("Shape", "Size") and self.kind.get(n.input[0]) == ACT):
                continue
            stack.extend(i for i in n.input if i)
        extra: list[onnx.NodeProto] = []
        for n in self.nodes:
            if not any(o in needed for o in n.output):
                continue
            if n.op_type in ("Shape", "Size") and self.kind.get(n.input[0]) == ACT:
                extra += self._shape_of_act(n, ids)
                continue
            nodes.append(n)
        inits = [
            numpy_helper.from_array(self.weights[t], t) if t in self.weights else self.inits[t]
            for t in needed
            if t in self.inits
        ]
        used_inputs = [p for p in self.graph_inputs if p.name in needed or any(p.name in n.input for n in extra)]
        outs = [
            helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.asarray(self.probe[0][t]).dtype), None)
            for t in outputs
        ]
        graph = helper.make_graph(extra + nodes, "bbct_index", used_inputs, outs, inits)
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        ig = F.IndexGraph(m.SerializeToString(), tuple(p.name for p in used_inputs), tuple(outputs))
        for feeds, probe in zip(self.probe_feeds, self.probe, strict=True):
            try:
                got = ig.run(feeds)
            except Exception as e:  # onnxruntime's errors: the subgraph is not self-contained
                raise UnsupportedGraphError(f"the index subgraph (positions, masks) cannot run alone: {e}") from None
            for t in outputs:
                if not np.array_equal(got[t], probe[t]):
                    raise UnsupportedGraphError(f"index tensor {t!r} does not reproduce the graph's value")
        return ig

    def _shape_of_act(self, n: onnx.NodeProto, ids: str) -> list[onnx.NodeProto]:
        t = n.input[0]
        s1, s2 = np.shape(self.probe[0][t]), np.shape(self.probe[1][t])
        (b1, q1, _), (b2, q2, _) = self.probes
        pieces, nodes = [], []
        sid = f"{n.output[0]}__ids_shape"
        nodes.append(helper.make_node("Shape", [ids], [sid]))
        for k, (d1, d2) in enumerate(zip(s1, s2, strict=True)):
            p = f"{n.output[0]}__d{k}"
            if d1 == d2:
                nodes.append(helper.make_node("Constant", [], [p], value=numpy_helper.from_array(np.array([d1]))))
            elif (d1, d2) in ((b1, b2), (q1, q2)):
                j = 0 if (d1, d2) == (b1, b2) else 1
                st, en = f"{p}__st", f"{p}__en"
                nodes.append(helper.make_node("Constant", [], [st], value=numpy_helper.from_array(np.array([j]))))
                nodes.append(helper.make_node("Constant", [], [en], value=numpy_helper.from_array(np.array([j + 1]))))
                nodes.append(helper.make_node("Slice", [sid, st, en], [p]))
            else:
                raise UnsupportedGraphError(
                    f"node {n.name!r} (Shape): dimension {k} of {t!r} is neither batch, sequence nor constant"
                )
            pieces.append(p)
        a = _attrs(n)
        full = f"{n.output[0]}__full"
        nodes.append(helper.make_node("Concat", pieces, [full], axis=0))
        if n.op_type == "Size":
            nodes.append(helper.make_node("ReduceProd", [full], [n.output[0]], keepdims=0))
        elif "start" in a or "end" in a:
            st, en = f"{full}__st", f"{full}__en"
            nodes.append(
                helper.make_node("Constant", [], [st], value=numpy_helper.from_array(np.array([a.get("start", 0)])))
            )
            nodes.append(
                helper.make_node("Constant", [], [en], value=numpy_helper.from_array(np.array([a.get("end", len(s1))])))
            )
            nodes.append(helper.make_node("Slice", [full, st, en], [n.output[0]]))
        else:
            nodes.append(helper.make_node("Identity", [full], [n.output[0]]))
        return nodes

    def run(self) -> F.FGraph:
        from bbct.simulator.frontend.patterns import run_patterns

        self.check_ops()
        self.classify()
        self.check_outputs()
        self.assign_roles()
        self.check_finite(computed=False)
        self.run_probes()
        self.check_finite(computed=True)
        self.fold_invariant_index()
        nodes = self.act_nodes()
        outputs = tuple(o.name for o in self.model.graph.output)
        ctx = PatternContext(self)
        try:
            with np.errstate(all="ignore"):  # the patterns compare probe values; an overflow fails a match
                nodes = run_patterns(nodes, ctx)
            for n in nodes:
                if isinstance(n, F.OnnxOp):
                    raise n.error(f"{n.op_type} is not part of any supported pattern (`bbct ops` lists them)")
        except UnsupportedGraphError:
            self.check_probe_overflow()  # the cause, when the float graph itself overflows
            raise
        act = {n.name for n in nodes}
        index_used = sorted({t for n in nodes for t in n.inputs if t not in act and t not in self.roles})
        ig = self.index_graph(index_used)
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        ids = next(k for k, v in self.roles.items() if v == "input_ids")
        info = {
            "opset": opset,
            "producer": self.model.producer_name,
            "vocab_size": self.tables.get(ids),
            "type_vocab_size": next((self.tables.get(k) for k, v in self.roles.items() if v == "token_type_ids"), None),
            "quant_not_honoured": dict(self.quant_notes),
            "given_activations": dict(self.given_acts),
            "given_exact": dict(self.given_exact),
        }
        return F.FGraph(tuple(nodes), dict(self.roles), outputs, ig, info)


class PatternContext:
    """What the pattern passes may ask of the import: probe shapes and values by tensor name."""

    def __init__(self, imp: _Importer) -> None:
        self.imp = imp

    def given(self, t: str) -> F.GivenQuant | None:
        """The stored codes and parameters of constant ``t`` when a DequantizeLinear of
        constants computes it (a quantized weight), else None."""
        return self.imp.given(t)

    def note(self, t: str, why: str) -> None:
        self.imp.quant_notes[t] = why

    def give(self, t: str, g: F.GivenQuant, producer: str) -> None:
        """Activation ``t`` (computed by ONNX node ``producer``) comes through the given
        quantization ``g``: lowering honours it at the node that keeps the name ``t``."""
        self.imp.given_acts[t] = (g, producer)

    def shape(self, t: str, probe: int = 0) -> tuple[int, ...]:
        return tuple(np.shape(self.imp.probe[probe][t]))

    def probe_value(self, t: str, probe: int = 0) -> np.ndarray | None:
        return self.imp.probe[probe].get(t)

    def is_index(self, t: str) -> bool:
        return self.imp.kind.get(t) == INDEX

    def role(self, t: str) -> str | None:
        return self.imp.roles.get(t)

    def sizes(self, probe: int = 0) -> tuple[int, int]:
        b, s, _ = self.imp.probes[probe]
        return b, s

    def index_value(self, t: str, probe: int = 0) -> np.ndarray | None:
        return self.imp.probe[probe].get(t) if self.is_index(t) else None


def load_graph(path_or_model: str | Path | onnx.ModelProto) -> F.FGraph:
    """Import an ONNX encoder as a typed float graph; errors name the file, node and op."""
    if isinstance(path_or_model, onnx.ModelProto):
        m, where = path_or_model, f"model {path_or_model.graph.name or '(unnamed graph)'}"
    else:
        m, where = load_onnx(path_or_model), str(path_or_model)
    # the weights leave the protobuf once (a file's is dropped here): the checks, rewrites and
    # probes then copy and serialize kilobytes, and onnxruntime reads the arrays
    m, weights = detach_weights(m)
    try:
        onnx.checker.check_model(checkable(m, weights))
    except (onnx.checker.ValidationError, ValueError) as e:
        raise BbctError(f"{where}: malformed ONNX model: {str(e).splitlines()[0]}") from None
    from bbct.simulator.export import read_static_activations
    from bbct.simulator.frontend.intops import rewrite_integer_ops

    m = rewrite_integer_ops(m)
    try:
        m, static = read_static_activations(m, weights)  # bbct's own exported activation exponents
        fg = _Importer(m, where, weights).run()
        if static:
            fg.info["static_exponents"] = static
        return fg
    except UnsupportedGraphError as e:
        msg = str(e).splitlines()[0]
        raise UnsupportedGraphError(msg if msg.startswith(where) else f"{where}: {msg}") from None
