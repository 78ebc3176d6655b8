"""Lowering: a typed float graph + a :class:`Config` -> the integer :class:`Graph`.

This is the one place where floats become integers: weights are quantized to their block
formats and aligned for the MAC array, biases get an exponent, nonlinear kernels get their
integer constants and tables, static activation exponents come from calibration statistics
(keyed by the float graph's tensor names).

Lowering is a named pipeline of passes (:data:`PASSES`; ``bbct ir --after PASS`` prints the
graph after one): ``import`` (ONNX -> float graph, with the pattern passes), ``roles`` (which
config op class and layer each node belongs to), ``emit`` (one rule per float node type,
:data:`RULES`, writes the integer nodes; the rules quantize weights as they meet them, a
weight shared by several layers once).

The integer dataflow of one post-LayerNorm encoder layer (``act`` = block-scaled format)::

    x(act) -align-> linear(Wq|Wk|Wv) -requant-> q,k,v(act)
    q -align(row)-> heads ; k,v -align(sequence)-> heads
    Q K^T -rescale(scale)-> s18 @2^-9 ; + mask ; softmax -> u8 P
    P V -merge heads-requant-> context(act) -align-> linear(Wo) -requant-> (act)
    x + attn -> residual(s16 blocks) -align-> layernorm -requant-> h(act)
    h -align-> linear(W1) -requant(fixed)-> gelu -requant-> (act) -align-> linear(W2) -> (act)
    h + ffn -> residual -align-> layernorm -requant-> x'(act)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bbct.kernels.align import align
from bbct.kernels.formats import IntFormat, QTensor, Rounding, Saturation, ScaleKind
from bbct.kernels.gelu import make_gelu_lut, make_gelu_poly
from bbct.kernels.l2norm import make_l2norm_params
from bbct.kernels.layernorm import make_layernorm_params
from bbct.kernels.meanpool import make_mean_pool_params
from bbct.kernels.quantize import block_exponents, exponent_window, gptq, mse_exponents, quantize
from bbct.kernels.relu import make_relu_params
from bbct.kernels.requantize import quantize_multiplier
from bbct.kernels.softmax import make_softmax_params
from bbct.kernels.tanh import make_tanh_lut
from bbct.simulator import ir
from bbct.simulator.config import Config, OpSettings
from bbct.simulator.errors import ConfigError, LoweringError
from bbct.simulator.frontend import fgraph as F

SCORES_EXP = -9  # attention scores at a fixed 2**-9 resolution; softmax_in_bits sets the range


@dataclass
class Calibration:
    """Per-channel max |x| over calibration tokens, by float-graph tensor name; and, for GPTQ,
    each linear's input second moments ``sum x x^T`` by the linear's tensor name."""

    amax: dict[str, np.ndarray] = field(default_factory=dict)
    sentences: int = 0
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def get(self, point: str) -> np.ndarray | None:
        return self.amax.get(point)


# elements of a weight quantized at a time (float64 temporaries of 8 MB each)
SLAB = 1 << 20


def _slabs(shape: tuple[int, ...], axis: int) -> tuple[int, list[tuple[slice, ...]]]:
    """The axis across the blocks of a 2-D weight with blocks along ``axis``, and index
    tuples cutting the weight along it into slabs of about :data:`SLAB` elements (whole
    blocks each: a block's scale and codes depend on its own values only); one slab for a
    smaller or not 2-D weight."""
    if len(shape) != 2 or int(np.prod(shape)) <= SLAB:
        return 0, [tuple(slice(None) for _ in shape)]
    other = 1 - axis % 2
    step = max(1, SLAB // max(1, shape[1 - other]))
    cuts = [slice(i, min(i + step, shape[other])) for i in range(0, shape[other], step)]
    return other, [(c, slice(None)) if other == 0 else (slice(None), c) for c in cuts]


@dataclass(frozen=True)
class Role:
    """Where a float node sits: config op class, layer (None outside the encoder layers) and
    the short name its integer nodes take (``L0.q``, ``emb.ln``, ``classifier``...)."""

    op_class: str
    layer: int | None
    short: str


# -- roles ------------------------------------------------------------------------------------------
def assign_roles(fg: F.FGraph) -> dict[str, Role]:
    """Op class, layer and short name of every float node, from the attention structure.

    Layer ``i`` is the ``i``-th softmax; Q, K, V, the output projection, the residual sums,
    LayerNorms and the feed-forward block around it follow from the dataflow. Nodes before
    the first layer's input are the embedding stage; nodes after the last layer's output
    (CLS row, pooling, heads) the head. Classes are the config's op classes."""
    prod = fg.producers()
    cons = fg.consumers()
    roles: dict[str, Role] = {}

    def put(n: F.FNode | None, op_class: str, layer: int | None, short: str) -> None:
        if n is not None and n.name not in roles:
            roles[n.name] = Role(op_class, layer, short)

    def only(t: str, cls: type | tuple[type, ...]) -> F.FNode | None:
        c = [u for u in cons.get(t, []) if isinstance(u, cls)]
        return c[0] if len(c) == 1 else None

    layer_out: list[str] = []
    softmaxes = [n for n in fg.nodes if isinstance(n, F.Softmax)]
    for i, sm in enumerate(softmaxes):
        p = f"L{i}."
        sc = prod.get(sm.inputs[0])
        if not isinstance(sc, F.Scores):
            raise LoweringError(f"softmax {sm.name!r} does not read attention scores")
        qh, kh = prod[sc.inputs[0]], prod[sc.inputs[1]]
        pv = only(sm.name, F.MatMul)
        vh = prod.get(pv.inputs[1]) if pv is not None else None
        merge = only(pv.name, F.MergeHeads) if pv is not None else None
        o = only(merge.name, F.Linear) if merge is not None else None
        if vh is None or o is None:
            raise LoweringError(f"softmax {sm.name!r}: no P V product, head merge and output projection after it")
        lq, lk, lv = (prod.get(h.inputs[0]) for h in (qh, kh, vh))
        for lin, cls, short in ((lq, "query", "q"), (lk, "key", "k"), (lv, "value", "v")):
            if not isinstance(lin, F.Linear):
                raise LoweringError(f"attention {i}: the {cls} is not a linear layer")
            put(lin, cls, i, p + short)
        put(qh, "scores", i, p + "q.heads")
        put(kh, "scores", i, p + "k.heads")
        put(vh, "context", i, p + "v.heads")
        put(sc, "scores", i, p + "scores")
        put(sm, "softmax", i, p + "probs")
        put(pv, "context", i, p + "context.acc")
        put(merge, "context", i, p + "context")
        put(o, "attention_output", i, p + "attn_out")
        x_in = lq.inputs[0]
        res1 = only(o.name, F.Add)
        ln1 = only(res1.name, F.LayerNorm) if res1 is not None else None
        if ln1 is None:
            raise LoweringError(f"attention {i}: no residual sum and LayerNorm after the output projection")
        put(res1, "residual", i, p + "res1")
        put(ln1, "layernorm", i, p + "ln1")
        f1 = next((u for u in cons.get(ln1.name, []) if isinstance(u, F.Linear)), None)
        act = next((u for u in cons.get(f1.name, []) if isinstance(u, (F.Gelu, F.Relu))), None) if f1 else None
        f2 = only(act.name, F.Linear) if act is not None else None
        res2 = only(f2.name, F.Add) if f2 is not None else None
        ln2 = only(res2.name, F.LayerNorm) if res2 is not None else None
        if ln2 is None:
            raise LoweringError(f"layer {i}: no feed-forward block (linear, GELU/ReLU, linear, residual, LayerNorm)")
        put(f1, "intermediate", i, p + "ffn1")
        put(act, "gelu", i, p + "gelu")
        put(f2, "output", i, p + "ffn2")
        put(res2, "residual", i, p + "res2")
        put(ln2, "layernorm", i, p + "ln2")
        layer_out.append(ln2.name)
        if i == 0:
            _embedding_roles(fg, x_in, prod, put)
    if not softmaxes:
        raise LoweringError("no attention in the graph: not an encoder")
    _head_roles(fg, layer_out[-1], cons, put)
    for n in fg.nodes:
        if n.name not in roles:
            raise LoweringError(f"node {n.sources[0] if n.sources else n.name!r} ({n.op}): outside every known role")
    return roles


def _embedding_roles(fg: F.FGraph, x0: str, prod: dict, put: Callable) -> None:
    n = prod.get(x0)
    if isinstance(n, F.Linear):  # embedding projection (ELECTRA, ALBERT)
        put(n, "embedding", None, "emb.proj")
        n = prod.get(n.inputs[0])
    if not isinstance(n, F.LayerNorm):
        raise LoweringError("no LayerNorm after the embedding lookups")
    put(n, "layernorm", None, "emb.ln")
    e = prod.get(n.inputs[0])
    if not isinstance(e, (F.EmbeddingSum, F.Embedding)):
        raise LoweringError("the embedding LayerNorm does not read embedding lookups")
    put(e, "embedding", None, "emb.sum")


def _head_roles(fg: F.FGraph, last: str, cons: dict, put: Callable) -> None:
    stack, linears = [last], []
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        for u in cons.get(t, []):
            if u.name in seen:
                continue
            seen.add(u.name)
            if isinstance(u, F.TakeRow):
                put(u, "pooler", None, "pooler.cls")
            elif isinstance(u, F.MeanPool):
                put(u, "pooler", None, "pooler.mean")
            elif isinstance(u, F.L2Normalize):
                put(u, "pooler", None, "pooler.l2")
            elif isinstance(u, F.Linear):
                linears.append(u)
            elif isinstance(u, F.Tanh):
                put(u, "tanh", None, "pooler")
            elif isinstance(u, (F.Gelu, F.Relu)):
                put(u, "gelu", None, f"head.{u.op}")
            stack.append(u.name)
    outs = set(fg.outputs)
    for k, lin in enumerate(linears):
        final = lin.name in outs
        put(
            lin,
            "classifier" if final else "pooler",
            None,
            "classifier" if final else ("pooler.dense" if k == 0 else f"head.dense{k}"),
        )


# -- formats ------------------------------------------------------------------------------------------
def _fixed_fmt(bits: int, s: OpSettings, signed: bool = True) -> IntFormat:
    return IntFormat(bits=bits, signed=signed, block_size=0, rounding=s.rounding_mode, saturation=s.saturation_mode)


def _act_fmt(s: OpSettings, bits: int | None = None) -> IntFormat:
    return IntFormat(
        bits=bits or s.act_bits,
        signed=True,
        block_axis=-1,
        block_size=s.act_block,
        rounding=s.rounding_mode,
        saturation=s.saturation_mode,
    )


def _fixed_exp_for_range(bits: int, max_abs: float) -> int:
    """Smallest exponent e with max_abs <= (2**(bits-1)-1) * 2**e."""
    qmax = (1 << (bits - 1)) - 1
    e = int(np.ceil(np.log2(max_abs / qmax)))
    while max_abs > qmax * 2.0**e:
        e += 1
    while max_abs <= qmax * 2.0 ** (e - 1):
        e -= 1
    return e


# -- the emit pass ----------------------------------------------------------------------------------
RULES: dict[type, Callable[[_Emitter, F.FNode], str]] = {}


def rule(*types: type) -> Callable:
    """Register the lowering of float node types to integer nodes."""

    def deco(fn: Callable) -> Callable:
        for t in types:
            RULES[t] = fn
        return fn

    return deco


class _Emitter:
    def __init__(self, fg: F.FGraph, config: Config, calib: Calibration | None, roles: dict[str, Role]) -> None:
        self.fg = fg
        self.cfg = config
        self.calib = calib
        self.roles = roles
        self.prod = fg.producers()
        self.cons = fg.consumers()
        self.nodes: list[ir.Node] = []
        self.by_name: dict[str, ir.Node] = {}  # integer tensor -> the node that made it
        self.storage: list[dict] = []
        self.fallbacks: list[str] = []
        self.value: dict[str, str] = {}  # float tensor -> integer tensor holding its value
        self.aligned: dict[tuple, str] = {}
        self.masks: dict[tuple, str] = {}
        self.weights: dict[tuple, tuple[QTensor, np.ndarray, int]] = {}
        self.static_given: dict[str, str] = {}  # activations whose given static exponents are used
        self.static_notes: dict[str, str] = {}  # ... and those not used (why)
        self.codes: dict[str, tuple[str, F.GivenQuant]] = {}  # value -> its given codes (qdq.dequantize)
        self.given_done: dict[str, str] = {}  # given activations quantized to their codes -> what they are
        # linear -> digest of its float weight: equal digests share one stored weight
        self.weight_keys = {n.name: _weight_key(n) for n in fg.nodes if isinstance(n, F.Linear)}
        for name in fg.inputs:
            self.value[name] = name
        if fg.index is not None:
            for t in fg.index.outputs:
                self.value[t] = t

    # -- helpers ------------------------------------------------------------------------------------
    def role(self, n: F.FNode) -> Role:
        return self.roles[n.name]

    def settings(self, n: F.FNode, op_class: str | None = None) -> OpSettings:
        r = self.role(n)
        return self.cfg.settings(op_class or r.op_class, r.layer, n.op, (r.short, n.name))

    def add(self, node: ir.Node) -> str:
        if node.name in self.by_name:
            raise LoweringError(f"integer node name {node.name!r} used twice")
        self.by_name[node.name] = node
        self.nodes.append(node)
        return node.name

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.by_name:
            k += 1
            name = f"{base}#{k}"
        return name

    def users(self, n: F.FNode) -> list[F.FNode]:
        return self.cons.get(n.name, [])

    def weight_fmt(self, s: OpSettings, axis: int) -> IntFormat:
        return IntFormat(
            bits=s.weight_bits,
            signed=True,
            block_axis=axis,
            block_size=s.weight_block,
            scale=s.weight_scale_kind,
            mant_bits=s.weight_mant_bits,
            rounding=Rounding.RND_CONV,
            saturation=Saturation.SAT,
        )

    def count(self, what: str, numel: int, bits: int, scale_blocks: int, s: OpSettings | None) -> None:
        scale_bits = 0
        if s is not None and scale_blocks:
            per = s.weight_exp_bits + (s.weight_mant_bits if s.weight_scale_kind == ScaleKind.MULT else 0)
            scale_bits = scale_blocks * per
        self.storage.append(
            {
                "name": what,
                "numel": int(numel),
                "bits": int(bits),
                "scale_bits": int(scale_bits),
                "matrix": s is not None,
            }
        )

    def quant_weight(
        self, w: np.ndarray, s: OpSettings, axis: int, what: str, hessian_keys: tuple[str, ...] = ()
    ) -> QTensor:
        """Weight codes; ``hessian_keys`` given (the linears that use this weight), GPTQ applies
        when the settings ask for it, with the sum of their input statistics."""
        fmt = self.weight_fmt(s, axis)
        w = np.asarray(w)
        if w.dtype.kind != "f":
            w = w.astype(np.float64)
        if not np.all(np.isfinite(w)):  # as float64: every float32 (float16) is one, the same
            raise LoweringError(f"node {what}: weight of {hessian_keys[0] if hessian_keys else what!r} is not finite")
        if s.weight_method == "gptq" and hessian_keys:
            w = np.asarray(w, dtype=np.float64)
            hs = [self.calib.hessians.get(k) for k in hessian_keys] if self.calib is not None else [None]
            h = None if any(x is None for x in hs) else sum(hs[1:], hs[0])
            if h is None:
                raise LoweringError(
                    f"node {what}: weight_method='gptq' needs calibration data with input statistics "
                    "(run with calibration sentences, or use weight_method='rtn')"
                )
            q = gptq(w, fmt, h, s.weight_clip_search, act_order=s.weight_order == "act", exp_bits=s.weight_exp_bits)
            self.count(what, w.size, s.weight_bits, int(np.asarray(q.exp).size), s)
            return q
        # block by block, a slab of whole blocks at a time: the float64 temporaries of a large
        # table (30k x 384) are those of a slab, not of the table several times over
        other, slabs = _slabs(w.shape, axis)
        exps, mants = [], []
        for sl in slabs:
            part = np.asarray(w[sl], dtype=np.float64)
            if s.weight_clip_search and fmt.scale == ScaleKind.POW2:
                e, m = mse_exponents(part, fmt, s.weight_clip_search), None
            else:
                e, m = block_exponents(part, fmt)
            exps.append(e)
            mants.append(m)
        if len(slabs) == 1:  # exponents of any shape (a 1-D weight's may be 0-d): no slicing
            exp = exponent_window(exps[0], s.weight_exp_bits)  # exponents fit weight_exp_bits
            q = quantize(part, fmt, exp, mants[0])  # part: the whole weight, as float64
        else:
            exp = exponent_window(np.concatenate(exps, axis=other), s.weight_exp_bits)  # the whole tensor's window
            mant = None if mants[0] is None else np.concatenate(mants, axis=other)
            qs = [
                quantize(np.asarray(w[sl], np.float64), fmt, exp[sl], None if mant is None else mant[sl])
                for sl in slabs
            ]
            q = QTensor(
                np.concatenate([p.data for p in qs], axis=other),
                fmt,
                np.concatenate([p.exp for p in qs], axis=other),
                None if mant is None else np.concatenate([p.mant for p in qs], axis=other),
                {"overflow": sum(int(p.meta.get("overflow", 0)) for p in qs)},
            )
        self.count(what, w.size, s.weight_bits, int(np.asarray(q.exp).size), s)
        return q

    def static_exp(self, point: str, fmt: IntFormat, s: OpSettings, ndim: int) -> np.ndarray | None:
        """Calibrated block exponents for float tensor ``point``, or None (dynamic)."""
        given = (self.fg.info.get("static_exponents") or {}).get(point)
        if given is not None:
            exp = _qdq.given_static_exp(given, fmt, s)
            if exp is None or s.scaling != "static":
                why = "the config's scaling is dynamic" if s.scaling != "static" else f"not in {fmt.short()} blocks"
                self.static_notes[point] = f"static exponents from {given['source']}: {why}; bbct's config instead"
            else:
                self.static_given[point] = f"static exponents ({fmt.short()}) from {given['source']}"
                return exp.reshape((1,) * (ndim - 1) + (-1,))
        if s.scaling != "static":
            return None
        amax = self.calib.get(point) if self.calib is not None else None
        if amax is None:
            if self.calib is None:
                raise LoweringError(
                    f"tensor {point}: scaling='static' needs calibration data (run with calibration "
                    "sentences, or use scaling='dynamic')"
                )
            self.fallbacks.append(point)
            return None
        a = np.asarray(amax, dtype=np.float64).reshape((1,) * (ndim - 1) + (-1,))
        exp, _ = block_exponents(a, IntFormat(bits=fmt.bits, block_axis=-1, block_size=fmt.block_size))
        return np.asarray(exp, dtype=np.int32)

    def requant(self, name: str, x: str, s: OpSettings, point: str, ndim: int, onnx: str | None) -> str:
        if _qdq.quantized_next(self, point):  # the model gives this tensor's codes: rounded to them there
            return x
        fmt = _act_fmt(s)
        return self.add(
            ir.Requant(name=name, inputs=(x,), onnx_name=onnx, fmt=fmt, exp=self.static_exp(point, fmt, s, ndim))
        )

    def align(self, name: str, x: str, s: OpSettings, axes: tuple[int, ...] = (-1,), guard: int | None = None) -> str:
        g = s.act_guard if guard is None else guard
        key = (x, axes, g, s.rounding_mode)
        if key not in self.aligned:
            self.aligned[key] = self.add(
                ir.Align(name=self.unique(name), inputs=(x,), reduce_axes=axes, guard=g, rounding=s.rounding_mode)
            )
        return self.aligned[key]

    def is_fixed(self, t: str) -> bool:
        """The integer tensor is one fixed-point value per tensor (a nonlinear output)."""
        n = self.by_name.get(t)
        return isinstance(n, (ir.Tanh, ir.L2Normalize, ir.Gelu, ir.Softmax, ir.LayerNorm))

    def ndim(self, t: str) -> int:
        """Rank of an activation: 2 after a row is taken or pooled, else 3."""
        n = self.prod.get(t)
        while n is not None:
            if isinstance(n, (F.TakeRow, F.MeanPool)):
                return 2
            if not n.inputs or isinstance(n, (F.Embedding, F.EmbeddingSum)):
                return 3
            n = self.prod.get(n.inputs[0])
        return 3

    def run(self) -> ir.Graph:
        for n in self.fg.nodes:
            fn = RULES.get(type(n))
            if fn is None:
                raise LoweringError(f"node {n.name!r} ({n.op}): no integer lowering rule")
            self.value[n.name] = fn(self, n)
            if _qdq.given_at(self, n.name) is not None:
                self.value[n.name] = _qdq.honour_output(self, n, self.value[n.name])
        outputs = {}
        for o in self.fg.outputs:
            outputs[_output_role(self.fg, o)] = self.value[o]
        ids = self.fg.role_input("input_ids")
        info = {
            "storage": self.storage,
            "dynamic_fallback": self.fallbacks,
            "vocab_size": self.fg.info.get("vocab_size"),
            "type_vocab_size": self.fg.info.get("type_vocab_size") or 0,
            "max_positions": self.fg.info.get("max_positions"),
            "input_ids": ids,
            "onnx_outputs": {_output_role(self.fg, o): o for o in self.fg.outputs},
            "acc_warnings": acc_warnings(self.nodes, self.fg.info.get("max_positions")),
            "given_quantization": _qdq.given_report(self.fg, self.static_given, self.static_notes, self.given_done),
        }
        return ir.Graph(
            nodes=tuple(self.nodes),
            outputs=outputs,
            config_name=self.cfg.name,
            info=info,
            inputs=dict(self.fg.inputs),
            index=self.fg.index,
        )


def _output_role(fg: F.FGraph, o: str) -> str:
    """A graph output's role name: logits, last_hidden_state, pooler_output, or its own name."""
    n = fg.producers().get(o)
    if o in ("logits", "last_hidden_state", "pooler_output", "sentence_embedding"):
        return o
    if isinstance(n, F.Linear):
        return "logits"
    if isinstance(n, F.LayerNorm):
        return "last_hidden_state"
    if isinstance(n, F.Tanh):
        return "pooler_output"
    return o


def acc_warnings(nodes: list[ir.Node] | tuple[ir.Node, ...], max_seq: int | None = None) -> list[str]:
    """Accumulators that can overflow: for each :class:`ir.Linear` and :class:`ir.MatMul`, the
    signed width its sum of products needs in the worst case, ``bitlen(B) + 1`` with ``B`` a
    bound on every prefix sum, and a warning ``"node NAME: worst case needs N accumulator
    bits, acc_bits=M"`` where ``N > M``.

    ``B = max|x| * S``. ``max|x|``: the input's codes at its format's extreme
    (``2**(bits-1)`` signed, times the multiplier maximum for MULT scales), shifted left by
    the align guard. ``S``, a bound on ``sum_k |w[k, n]|`` over a column: a linear's aligned
    weight, exactly (its largest column sum of ``|wide|``); Q K^T: the head dimension times
    ``max|k|``; P V: softmax rows sum to at most ``2**out_bits + seq/2`` codes (one half-up
    rounding per element) times ``max|v|``, with ``seq`` up to ``max_seq`` (default: the rows
    of the position embedding table; without either P V is not checked). The bias is added
    after the products and is not counted. Nodes whose operand widths cannot be traced are
    skipped."""
    by = {n.name: n for n in nodes}
    if max_seq is None:
        pos = by.get("emb.position")
        max_seq = int(pos.table.shape[0]) if isinstance(pos, ir.Embed) else None

    def max_abs(t: str) -> int | None:
        n = by.get(t)
        if isinstance(n, ir.Align):
            m = max_abs(n.inputs[0])
            return None if m is None else m << n.guard
        if isinstance(n, (ir.SplitHeads, ir.MergeHeads, ir.TakeRow)):
            return max_abs(n.inputs[0])
        fmt = getattr(n, "out_fmt", None) or getattr(n, "fmt", None)
        if not isinstance(fmt, IntFormat):
            return None
        mant = (1 << fmt.mant_bits) - 1 if fmt.scale == ScaleKind.MULT else 1
        return (1 << (fmt.bits - 1) if fmt.signed else (1 << fmt.bits) - 1) * mant

    def width(t: str) -> int | None:  # the last axis of a tensor, from the linear that made it
        n = by.get(t)
        while n is not None and not isinstance(n, ir.Linear):
            n = by.get(n.inputs[0]) if n.inputs else None
        return None if n is None else int(n.weight.shape[1])

    out = []
    for n in nodes:
        bound = None
        if isinstance(n, ir.Linear):
            xm = max_abs(n.inputs[0])
            colsum = int(np.abs(n.weight).sum(axis=0).max()) if n.weight.size else 0
            bound = None if xm is None else xm * colsum
        elif isinstance(n, ir.MatMul):
            am, bm = max_abs(n.inputs[0]), max_abs(n.inputs[1])
            a = by.get(n.inputs[0])
            if isinstance(a, ir.Softmax):
                rows = None if max_seq is None else (1 << a.out_fmt.bits) + (max_seq + 1) // 2
            elif isinstance(a, ir.SplitHeads) and am is not None:
                w = width(n.inputs[0])
                rows = None if w is None else (w // a.num_heads) * am
            else:
                rows = None
            bound = None if rows is None or bm is None else rows * bm
        if bound is not None:
            need = bound.bit_length() + 1
            if need > n.acc_bits:
                out.append(f"node {n.name}: worst case needs {need} accumulator bits, acc_bits={n.acc_bits}")
    return out


# -- rules ------------------------------------------------------------------------------------------
def _embed_name(fg: F.FGraph, n: F.EmbeddingSum, k: int, index: str) -> str:
    role = fg.inputs.get(index)
    if k == 0 and role == "input_ids":
        return "emb.word"
    tn = n.table_names[k].lower()
    for key, short in (("position", "emb.position"), ("token_type", "emb.token_type"), ("word", "emb.word")):
        if key in tn:
            return short
    return {"token_type_ids": "emb.token_type", "position_ids": "emb.position"}.get(role or "", f"emb.table{k}")


@rule(F.EmbeddingSum, F.Embedding)
def _embedding(e: _Emitter, n: F.FNode) -> str:
    s = e.settings(n)
    tables = n.tables if isinstance(n, F.EmbeddingSum) else (n.table,)
    tnames = n.table_names if isinstance(n, F.EmbeddingSum) else (n.table_name,)
    givens = (n.givens or (None,) * len(tables)) if isinstance(n, F.EmbeddingSum) else (n.given,)
    sums = (
        n
        if isinstance(n, F.EmbeddingSum)
        else F.EmbeddingSum(name=n.name, inputs=n.inputs * 2, tables=(n.table,) * 2, table_names=tnames * 2)
    )
    looked = []
    for k, (t, idx, g) in enumerate(zip(tables, n.inputs, givens, strict=True)):
        name = e.unique(_embed_name(e.fg, sums, k, idx))
        if g is not None:  # stored codes and scales, used as they are
            table = _qdq.given_weight(e, g, s, axis=-1, what=name)
        else:
            table = e.quant_weight(t, s, axis=-1, what=name)
        looked.append(e.add(ir.Embed(name=name, inputs=(e.value[idx],), table=table)))
    if len(looked) == 1:
        return looked[0]
    sr = e.cfg.settings("residual", None)
    fmt = _act_fmt(sr, sr.residual_bits)
    total = looked[0]
    for k, t in enumerate(looked[1:], start=1):
        last = k == len(looked) - 1
        point = n.name if last else f"{n.name}#partial{k}"
        given = _qdq.given_at(e, n.name if last else (n.partial_names[k - 1 : k] or ("",))[0])
        if given is not None:  # the sum rounded to 31 bits over twice the given range, then the given codes
            gfmt, exp = _qdq.given_sum_format(given, sr, 3)
            total = e.add(ir.Add(name="emb.sum" if last else f"emb.sum{k}", inputs=(total, t), fmt=gfmt, exp=exp))
            if not last:  # a partial sum's given codes, here; the last one's after the rule
                codes = _qdq.affine(e, f"emb.sum{k}", total, given, sr)
                e.given_done[n.partial_names[k - 1]] = "embedding partial sum"
                total = _qdq.dequantize(e, f"emb.sum{k}", codes, given, sr, n.partial_names[k - 1])
            continue
        total = e.add(
            ir.Add(
                name="emb.sum" if last else f"emb.sum{k}",
                inputs=(total, t),
                onnx_name=n.name if last else None,
                fmt=fmt,
                exp=e.static_exp(point, fmt, sr, 3),
            )
        )
    return total


def _out_linear_fmt(e: _Emitter, n: F.Linear) -> tuple[str, object]:
    """How a linear's accumulator is narrowed, from what reads it."""
    users = e.users(n)
    if len(users) == 1 and isinstance(users[0], F.Gelu):
        return "gelu", users[0]
    if len(users) == 1 and isinstance(users[0], F.Tanh):
        return "tanh", users[0]
    if n.name in e.fg.outputs:
        return "output", None
    return "act", None


def _weight_key(n: F.Linear) -> str:
    """Identity of a linear's weight by content: layers that share one weight (ALBERT) use one
    stored tensor whether the exporter kept one initializer or wrote identical copies."""
    w = np.ascontiguousarray(n.weight)
    return hashlib.sha256(str(w.shape).encode() + w.tobytes()).hexdigest()


def _weights(e: _Emitter, n: F.Linear, s: OpSettings, short: str) -> tuple[QTensor, np.ndarray, int]:
    key = (e.weight_keys[n.name], s)
    if key in e.weights:  # a weight shared by several layers: quantized and stored once
        return e.weights[key]
    sharing = tuple(k for k, v in e.weight_keys.items() if v == key[0])
    if n.w_given is not None:  # stored codes and scales, used as they are
        stored = _qdq.given_weight(e, n.w_given, s, axis=0, what=short)
    else:
        stored = e.quant_weight(n.weight, s, axis=0, what=short, hessian_keys=sharing)
    wide, ew = align(stored, reduce_axes=(0, 1), guard=s.weight_guard, rounding=Rounding.RND_CONV)
    out = (stored, ir.narrow_ints(wide), int(np.asarray(ew).ravel()[0]))
    e.weights[key] = out
    return out


@rule(F.Linear)
def _linear(e: _Emitter, n: F.Linear) -> str:
    r = e.role(n)
    s = e.settings(n)
    x = e.value[n.inputs[0]]
    src = e.prod.get(n.inputs[0])
    src_short = e.roles[src.name].short if src is not None else n.inputs[0]
    guard = 0 if e.is_fixed(x) else None  # one exponent for the whole tensor: nothing to align
    xa = e.align(f"{src_short}.aligned", x, s, guard=guard)
    stored, wide, w_exp = _weights(e, n, s, r.short)
    bias, bias_exp = None, 0
    if n.bias is not None:
        b = np.asarray(n.bias, dtype=np.float64)
        if not np.all(np.isfinite(b)):
            raise LoweringError(f"node {r.short}: bias of {n.name!r} has non-finite values")
        amax = float(np.max(np.abs(b))) if b.size else 0.0
        bias_exp = _fixed_exp_for_range(s.bias_bits, amax) if amax > 0 else 0
        bq = quantize(
            b.reshape(1, -1),
            IntFormat(bits=s.bias_bits, block_size=0, rounding=Rounding.RND_CONV),
            exp=np.array([[bias_exp]], dtype=np.int32),
        )
        bias = bq.data.reshape(-1).astype(np.int64)
        e.count(r.short + ".bias", b.size, s.bias_bits, 0, None)
    acc = e.add(
        ir.Linear(
            name=r.short + ".acc",
            inputs=(xa,),
            weight=wide,
            w_exp=w_exp,
            stored=stored,
            bias=bias,
            bias_exp=bias_exp,
            bias_bits=s.bias_bits,
            acc_bits=s.acc_bits,
            acc_saturation=s.acc_saturation_mode,
            bias_rounding=s.rounding_mode,
        )
    )
    return _narrow_linear(e, n, acc)


def _narrow_linear(e: _Emitter, n: F.Linear, acc: str) -> str:
    """Narrow a linear's accumulator for what reads it: GELU or tanh input, model output, activation."""
    r = e.role(n)
    s = e.settings(n)
    if _qdq.quantized_next(e, n.name):  # quantized to the given codes next, from the accumulator
        return acc
    kind, user = _out_linear_fmt(e, n)
    ndim = e.ndim(n.name)
    if kind == "gelu":
        sg = e.settings(user)
        amax = e.calib.get(n.name) if e.calib is not None else None
        # GELU input: calibrated range when known, else +-64 (far beyond where GELU(x) = x or 0)
        rng = float(np.max(amax)) if amax is not None and sg.scaling == "static" else 64.0
        e_g = _fixed_exp_for_range(sg.gelu_in_bits, max(rng, 1e-3))
        fmt, exp = _fixed_fmt(sg.gelu_in_bits, sg), np.full((1,) * ndim, e_g, np.int32)
        name = r.short
    elif kind == "tanh":
        st = e.settings(user)
        e_t = 3 - (st.tanh_in_bits - 1)  # +-8: tanh is +-1 to 1e-6 beyond
        fmt, exp = _fixed_fmt(st.tanh_in_bits, st), np.full((1,) * ndim, e_t, np.int32)
        name = r.short
    elif kind == "output":
        fmt, exp, name = _fixed_fmt(s.output_bits, s), None, r.short
    else:
        return e.requant(r.short, acc, s, n.name, ndim, n.name)
    return e.add(ir.Requant(name=name, inputs=(acc,), onnx_name=n.name, fmt=fmt, exp=exp))


@rule(F.Add)
def _residual(e: _Emitter, n: F.Add) -> str:
    r = e.role(n)
    s = e.settings(n)
    fmt = _act_fmt(s, s.residual_bits)
    a, b = (e.value[i] for i in n.inputs)
    g = _qdq.given_at(e, n.name)
    if g is not None:  # the sum rounded to 31 bits over twice the given range, then the given codes
        fmt, exp = _qdq.given_sum_format(g, s, e.ndim(n.name))
        return e.add(ir.Add(name=r.short + ".sum", inputs=(a, b), fmt=fmt, exp=exp))
    return e.add(
        ir.Add(name=r.short, inputs=(a, b), onnx_name=n.name, fmt=fmt, exp=e.static_exp(n.name, fmt, s, e.ndim(n.name)))
    )


@rule(F.LayerNorm)
def _layernorm(e: _Emitter, n: F.LayerNorm) -> str:
    r = e.role(n)
    s = e.settings(n)
    x = e.value[n.inputs[0]]
    eps = float(n.eps)
    have = e.codes.get(x)
    if have is not None and not np.ndim(have[1].scale):
        # LayerNorm is scale-invariant but for eps: it reads the given codes c of x = c * s
        # themselves, and LN(c * s) = (c - mean) / sqrt(var(c) + eps / s**2)
        x, eps = have[0], eps / float(np.float32(have[1].scale)) ** 2
    src = e.by_name.get(x)
    bits = (
        _qdq.out_bits(src) if isinstance(src, ir.AffineQuantize) else getattr(getattr(src, "fmt", None), "bits", None)
    )
    h = int(n.gamma.size)
    if bits is not None and 2 * (bits - 1 + s.act_guard) + h.bit_length() > 59:  # the kernel's int64 variance
        raise ConfigError(
            f"node {r.short}: its input of {bits} bits aligned with act_guard={s.act_guard} reaches "
            f"{bits - 1 + s.act_guard} magnitude bits; the LayerNorm variance of {h}-wide rows takes at most "
            f"{(59 - h.bit_length()) // 2}: lower residual_bits or act_guard"
        )
    xa = e.align(r.short + ".in", x, s)
    p = make_layernorm_params(
        np.asarray(n.gamma, np.float64), np.asarray(n.beta, np.float64), eps, out_bits=s.layernorm_out_bits
    )
    e.count(r.short + ".gamma", n.gamma.size, 16, 0, None)
    e.count(r.short + ".beta", n.beta.size, 16, 0, None)
    y = e.add(
        ir.LayerNorm(
            name=r.short + ".y",
            inputs=(xa,),
            method="isqrt",
            params=p,
            e_in=0,
            e_out=int(p.e_out),
            out_fmt=_fixed_fmt(s.layernorm_out_bits, s),
        )
    )
    return e.requant(r.short, y, s, n.name, e.ndim(n.name), n.name)


@rule(F.SplitHeads)
def _split(e: _Emitter, n: F.SplitHeads) -> str:
    r = e.role(n)
    s = e.settings(n)
    rows = r.op_class == "scores" and not n.transpose  # queries: one exponent per row
    x = e.value[n.inputs[0]]
    xa = e.align(r.short.replace(".heads", ".aligned"), x, s, axes=(-1,) if rows else (1, 2))
    y = e.add(ir.SplitHeads(name=r.short, inputs=(xa,), num_heads=n.num_heads, transpose=n.transpose))
    _qdq.moved_codes(
        e,
        x,
        y,
        lambda name, c: ir.SplitHeads(name=name, inputs=(c,), num_heads=n.num_heads, transpose=n.transpose, codes=True),
    )
    return y


@rule(F.Scores)
def _scores(e: _Emitter, n: F.Scores) -> str:
    r = e.role(n)
    s = e.settings(n)
    sm = next((u for u in e.users(n) if isinstance(u, F.Softmax)), None)
    ssm = e.settings(sm) if sm is not None else s
    given = _qdq.codes_matmul(e, n, *(e.value[i] for i in n.inputs), s)
    if given is not None:  # Q and K come as given codes: their exact product, rescaled once
        acc, unit = given
        g = _qdq.given_at(e, n.name)
        if g is not None:  # to the given scores' codes next: a fine fixed format first
            bits = _qdq.AFFINE_IN_BITS
            exp = _qdq.fine_exp(bits, 2 * _qdq.given_range(g))
        else:
            bits, exp = ssm.softmax_in_bits, SCORES_EXP
        return _qdq.scores_of_codes(e, n, acc, unit, bits, exp, s)
    acc = e.add(
        ir.MatMul(
            name=r.short + ".acc",
            inputs=tuple(e.value[i] for i in n.inputs),
            acc_bits=s.acc_bits,
            acc_saturation=s.acc_saturation_mode,
        )
    )
    mult, shift = quantize_multiplier(float(n.scale))
    return e.add(
        ir.Rescale(
            name=r.short,
            inputs=(acc,),
            multiplier=mult,
            shift=shift,
            e_out=SCORES_EXP,
            fmt=_fixed_fmt(ssm.softmax_in_bits, ssm),
        )
    )


@rule(F.Softmax)
def _softmax(e: _Emitter, n: F.Softmax) -> str:
    r = e.role(n)
    ssm = e.settings(n)
    inputs = [e.value[n.inputs[0]]]
    src = e.by_name.get(inputs[0])
    if not (isinstance(src, ir.Rescale) and src.e_out == SCORES_EXP and src.fmt.bits == ssm.softmax_in_bits):
        inputs[0] = _qdq.to_fixed(e, r.short + ".in", inputs[0], ssm.softmax_in_bits, SCORES_EXP, ssm, 4)
    if n.mask_kind != "none":
        lo = -(1 << (ssm.softmax_in_bits - 1))
        v = n.mask_value
        mv = max(lo, int(np.round(v / 2.0**SCORES_EXP))) if np.isfinite(v) else lo
        key = (n.inputs[1], n.mask_kind, float(v), mv, ssm.softmax_in_bits)
        if key not in e.masks:
            e.masks[key] = e.add(
                ir.Mask(
                    name=e.unique("mask"),
                    inputs=(e.value[n.inputs[1]],),
                    kind=n.mask_kind,
                    float_value=float(v),
                    value=mv,
                    e_out=SCORES_EXP,
                    bits=ssm.softmax_in_bits,
                )
            )
        inputs.append(e.masks[key])
        inputs = _qdq.given_masked_scores(e, n, inputs, ssm)
    out_bits = ssm.softmax_out_bits
    if _qdq.given_at(e, n.name) is not None:  # probabilities to the given codes next: 16 bits first
        out_bits = max(out_bits, 16)
    sp = make_softmax_params(
        e_in=SCORES_EXP,
        in_bits=ssm.softmax_in_bits,
        out_bits=out_bits,
        method=ssm.softmax_method,
        lut_addr_bits=ssm.softmax_lut_addr_bits,
    )
    return e.add(
        ir.Softmax(
            name=r.short,
            inputs=tuple(inputs),
            onnx_name=n.name,
            method=ssm.softmax_method,
            params=sp,
            e_in=SCORES_EXP,
            e_out=int(sp.e_out),
            out_fmt=_fixed_fmt(out_bits, ssm, signed=False),
        )
    )


@rule(F.MatMul)
def _matmul(e: _Emitter, n: F.MatMul) -> str:
    r = e.role(n)
    s = e.settings(n)
    given = _qdq.codes_matmul(e, n, *(e.value[i] for i in n.inputs), s)
    if given is not None:  # P and V come as given codes: their exact product, rescaled once
        acc, unit = given
        bits = _qdq.AFFINE_IN_BITS
        return _qdq.rescale_to(e, r.short, acc, unit, bits, math.floor(math.log2(unit)) - 2, s)
    return e.add(
        ir.MatMul(
            name=r.short,
            inputs=tuple(e.value[i] for i in n.inputs),
            acc_bits=s.acc_bits,
            acc_saturation=s.acc_saturation_mode,
        )
    )


@rule(F.MergeHeads)
def _merge(e: _Emitter, n: F.MergeHeads) -> str:
    r = e.role(n)
    s = e.settings(n)
    x = e.value[n.inputs[0]]
    m = e.add(ir.MergeHeads(name=r.short + ".merged", inputs=(x,)))
    _qdq.moved_codes(e, x, m, lambda name, c: ir.MergeHeads(name=name, inputs=(c,), codes=True))
    return e.requant(r.short, m, s, n.name, 3, n.name)


def _fixed_input(e: _Emitter, n: F.FNode, x: str, bits: int) -> str:
    """A table kernel's input: a linear's narrowed accumulator as it is, or a given tensor's
    value at a fixed format of ``bits`` over its given range."""
    have = e.codes.get(x)
    if have is None:
        return x
    exp = _qdq.fine_exp(bits, _qdq.given_range(have[1]))
    return _qdq.to_fixed(e, e.role(n).short + ".in", x, bits, exp, e.settings(n), e.ndim(n.inputs[0]))


def _fixed_input_exp(e: _Emitter, n: F.FNode, x: str) -> int:
    """The one exponent of a table kernel's input: a linear's accumulator narrowed to a fixed
    format (``_linear`` does so when GELU or tanh reads it)."""
    src = e.by_name.get(x)
    if not (isinstance(src, ir.Requant) and src.exp is not None and src.fmt.block_size == 0):
        raise LoweringError(f"node {n.name!r} ({n.op}): its input must come from a linear layer")
    return int(np.asarray(src.exp).ravel()[0])


@rule(F.Gelu)
def _gelu(e: _Emitter, n: F.Gelu) -> str:
    r = e.role(n)
    sg = e.settings(n)
    have = e.codes.get(e.value[n.inputs[0]])
    if n.table is not None and have is not None and have[1].same_grid(n.table_in):
        return _qdq.region_codes(e, n, have[0])  # given codes in, out and inside: one table
    x = _fixed_input(e, n, e.value[n.inputs[0]], sg.gelu_in_bits)
    e_g = _fixed_input_exp(e, n, x)
    if sg.gelu_method == "poly":
        if n.approximate == "tanh":
            raise LoweringError(
                f"node {r.short}: gelu_method='poly' implements the erf form; this model uses the tanh "
                "approximation: set gelu_method='lut'"
            )
        gp = make_gelu_poly(e_in=e_g, in_bits=sg.gelu_in_bits, out_bits=sg.gelu_out_bits)
    else:
        gp = make_gelu_lut(
            e_in=e_g,
            in_bits=sg.gelu_in_bits,
            addr_bits=sg.gelu_lut_addr_bits,
            out_bits=sg.gelu_out_bits,
            approximate=n.approximate,
        )
    g = e.add(
        ir.Gelu(
            name=r.short + ".y",
            inputs=(x,),
            method=sg.gelu_method,
            params=gp,
            e_in=e_g,
            e_out=int(gp.e_out),
            out_fmt=_fixed_fmt(sg.gelu_out_bits, sg),
        )
    )
    users = e.users(n)
    so = e.settings(users[0]) if len(users) == 1 and isinstance(users[0], F.Linear) else sg
    return e.requant(r.short, g, so, n.name, e.ndim(n.name), n.name)


@rule(F.Tanh)
def _tanh(e: _Emitter, n: F.Tanh) -> str:
    r = e.role(n)
    st = e.settings(n)
    x = _fixed_input(e, n, e.value[n.inputs[0]], st.tanh_in_bits)
    e_t = _fixed_input_exp(e, n, x)
    tp = make_tanh_lut(e_in=e_t, in_bits=st.tanh_in_bits, addr_bits=st.tanh_lut_addr_bits, out_bits=st.tanh_out_bits)
    return e.add(
        ir.Tanh(
            name=r.short,
            inputs=(x,),
            onnx_name=n.name,
            method=st.tanh_method,
            params=tp,
            e_in=e_t,
            e_out=int(tp.e_out),
            out_fmt=_fixed_fmt(st.tanh_out_bits, st),
        )
    )


@rule(F.Relu)
def _relu(e: _Emitter, n: F.Relu) -> str:
    r = e.role(n)
    x = e.value[n.inputs[0]]
    src = e.by_name.get(x)
    bits = getattr(src, "fmt", None).bits if isinstance(src, (ir.Requant, ir.Add)) else 62
    return e.add(ir.Relu(name=r.short, inputs=(x,), onnx_name=n.name, params=make_relu_params(bits)))


@rule(F.TakeRow)
def _take_row(e: _Emitter, n: F.TakeRow) -> str:
    r = e.role(n)
    x = e.value[n.inputs[0]]
    y = e.add(ir.TakeRow(name=r.short, inputs=(x,), onnx_name=n.name, index=n.index))
    _qdq.moved_codes(e, x, y, lambda name, c: ir.TakeRow(name=name, inputs=(c,), index=n.index))
    return y


@rule(F.MeanPool)
def _mean_pool(e: _Emitter, n: F.MeanPool) -> str:
    r = e.role(n)
    s = e.settings(n)
    xa = e.align(r.short + ".in", e.value[n.inputs[0]], s, axes=(1,))
    p = make_mean_pool_params(in_bits=s.act_bits + s.act_guard, out_bits=s.output_bits + 8, rounding=s.rounding_mode)
    m = e.add(ir.MeanPool(name=r.short + ".sum", inputs=(xa, e.value[n.inputs[1]]), params=p))
    return e.requant(r.short, m, s, n.name, 2, n.name)


@rule(F.L2Normalize)
def _l2(e: _Emitter, n: F.L2Normalize) -> str:
    r = e.role(n)
    s = e.settings(n)
    xa = e.align(r.short + ".in", e.value[n.inputs[0]], s)
    p = make_l2norm_params(eps=float(n.eps), out_bits=s.output_bits, rounding=s.rounding_mode)
    return e.add(
        ir.L2Normalize(
            name=r.short,
            inputs=(xa,),
            onnx_name=n.name,
            method="isqrt",
            params=p,
            e_in=0,
            e_out=int(p.e_out),
            out_fmt=_fixed_fmt(s.output_bits, s),
        )
    )


# -- the pipeline -----------------------------------------------------------------------------------
PASSES = ("import", "roles", "emit")


def lower(fg: F.FGraph, config: Config, calib: Calibration | None = None) -> ir.Graph:
    """Lower the float graph to the integer IR under ``config`` (static points need ``calib``)."""
    roles = assign_roles(fg)
    config.check_layers(1 + max((r.layer for r in roles.values() if r.layer is not None), default=-1))
    config.check_selectors([(n.op, (roles[n.name].short, n.name)) for n in fg.nodes])
    return _Emitter(fg, config, calib, roles).run()


from bbct.simulator import qdq as _qdq  # noqa: E402,F401  (registers the rules of given quantization)


def linear_inputs(fg: F.FGraph) -> list[str]:
    """The linears' tensor names: keys of :attr:`Calibration.hessians`."""
    return [n.name for n in fg.nodes if isinstance(n, F.Linear)]


def compression(graph: ir.Graph) -> dict[str, float]:
    """fp32 bytes / integer bytes, block scales included.

    ``weight_compression`` counts the matmul weights and embedding tables (the BBCT claim);
    ``model_compression`` adds biases and LayerNorm parameters at their stored widths. A
    weight shared by several layers (ALBERT) is counted once, as it is stored once.
    """
    st = graph.info["storage"]
    w_num = sum(e["numel"] for e in st if e["matrix"])
    w_bits = sum(e["numel"] * e["bits"] + e["scale_bits"] for e in st if e["matrix"])
    all_num = sum(e["numel"] for e in st)
    all_bits = sum(e["numel"] * e["bits"] + e["scale_bits"] for e in st)
    return {
        "weight_compression": 32.0 * w_num / w_bits,
        "model_compression": 32.0 * all_num / all_bits,
        "weight_bits_per_param": w_bits / w_num,
        "weight_params": w_num,
        "weight_bytes": w_bits / 8.0,
        "fp32_weight_bytes": 4.0 * w_num,
    }
