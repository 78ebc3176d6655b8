"""Pattern passes: fuse ONNX ops into the typed nodes hardware computes as one unit.

Each pass is a small function registered with :func:`pattern` under a name and a
description; :func:`run_patterns` applies them in registration order until none changes
the graph. A pass matches :class:`OnnxOp` nodes by op type and constants, checks what it
cannot see structurally on the import's probe values (a GELU region really computes GELU,
a mean-pooling mask really is the attention mask), and replaces the matched nodes by one
typed node that keeps the *last* matched tensor's name — so consumers, calibration and the
golden comparison see the same names as the ONNX graph.

No pass knows a model family: BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT and sentence-
embedding exports differ only in which of these patterns their graphs contain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from bbct.simulator.errors import UnsupportedGraphError
from bbct.simulator.frontend import fgraph as F


@dataclass(frozen=True)
class Pattern:
    name: str
    fn: Callable[[Rewriter], bool]
    describes: str


PATTERNS: dict[str, Pattern] = {}


def pattern(name: str, describes: str) -> Callable:
    """Register a pass: ``fn(rw) -> bool`` (True when it changed the graph)."""

    def deco(fn: Callable[[Rewriter], bool]) -> Callable[[Rewriter], bool]:
        PATTERNS[name] = Pattern(name, fn, describes)
        return fn

    return deco


class Rewriter:
    """A mutable node list with producer/consumer look-ups, for the passes."""

    def __init__(self, nodes: list[F.FNode], ctx: object, outputs: tuple[str, ...]) -> None:
        self.nodes = nodes
        self.ctx = ctx
        self.outputs = set(outputs)
        self._index()

    def _index(self) -> None:
        self.prod = {n.name: n for n in self.nodes}
        self.cons: dict[str, list[F.FNode]] = {}
        for n in self.nodes:
            for i in n.inputs:
                self.cons.setdefault(i, []).append(n)

    def onnx(self, t: str, *op_types: str) -> F.OnnxOp | None:
        """The producer of ``t`` when it is an unfused ONNX op of one of ``op_types``."""
        n = self.prod.get(t)
        if isinstance(n, F.OnnxOp) and (not op_types or n.op_type in op_types):
            return n
        return None

    def users(self, t: str) -> list[F.FNode]:
        return self.cons.get(t, [])

    def only_user(self, t: str) -> F.FNode | None:
        u = self.users(t)
        return u[0] if len(u) == 1 and t not in self.outputs else None

    def replace(self, old: list[F.FNode], new: F.FNode) -> None:
        """Remove ``old`` and put ``new`` where the last of them was; ``new.name`` must be the
        name of one removed node whose consumers it takes over; the other removed outputs
        must have no consumer outside ``old``."""
        gone = {id(n) for n in old}
        for n in old:
            if n.name == new.name:
                continue
            for u in self.users(n.name):
                if id(u) not in gone:
                    raise new.error(f"fusing {n.name!r}: it is also read by {u.name!r}")
            if n.name in self.outputs:
                raise new.error(f"fusing {n.name!r}: it is a graph output")
        last = max(i for i, n in enumerate(self.nodes) if id(n) in gone)
        keep = [n for i, n in enumerate(self.nodes) if id(n) not in gone or i == last]
        self.nodes = [new if id(n) in gone else n for n in keep]
        self._index()

    def alias(self, node: F.FNode, src: str) -> None:
        """Remove ``node`` (a no-op): its consumers read ``src`` instead (or, for a graph
        output, ``src``'s producer takes the node's name)."""
        if node.name in self.outputs:
            p = self.prod.get(src)
            if p is None or src in self.outputs:
                raise node.error("a graph output that is a graph input or another output")
            renamed = replace(p, name=node.name)
            self.nodes = [renamed if n is p else n for n in self.nodes if n is not node]
            self._rename(src, node.name)
        else:
            self.nodes = [n for n in self.nodes if n is not node]
            self._rename(node.name, src)
        self._index()

    def _rename(self, old: str, new: str) -> None:
        self.nodes = [
            replace(n, inputs=tuple(new if i == old else i for i in n.inputs)) if old in n.inputs else n
            for n in self.nodes
        ]


def _scalar(v: object) -> float | None:
    if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "fiu":
        return float(v.ravel()[0])
    return None


def _axes(n: F.OnnxOp) -> tuple[int, ...] | None:
    """Reduce axes from the attribute (opset < 18) or the constant second input."""
    if "axes" in n.attributes:
        return tuple(int(a) for a in n.attributes["axes"])
    a = n.operand(1)
    if isinstance(a, np.ndarray):
        return tuple(int(x) for x in a.ravel())
    return None


def _last_axis(n: F.OnnxOp, ndim: int) -> bool:
    ax = _axes(n)
    return ax is not None and len(ax) == 1 and ax[0] in (-1, ndim - 1)


# -- no-ops ---------------------------------------------------------------------------------------
# -- given quantization (QDQ models) ----------------------------------------------------------------
@pattern("fake_quant", "QuantizeLinear -> DequantizeLinear of an activation -> fake_quant (given scale, zero point)")
def _fake_quant(rw: Rewriter) -> bool:
    from bbct.simulator.frontend.onnx_in import given_quant

    for dq in rw.nodes:
        if not (isinstance(dq, F.OnnxOp) and dq.op_type == "DequantizeLinear" and dq.positions[:1] == (0,)):
            continue
        dyn = rw.onnx(dq.inputs[0], "DynamicQuantizeLinear")
        if dyn is not None:
            src = rw.ctx.imp.prod[dq.inputs[0]]
            if list(dq.inputs) != list(src.output):
                raise dq.error("DequantizeLinear of a DynamicQuantizeLinear must read its three outputs")
            g = F.GivenQuant(
                scale=np.float32(1.0), zero_point=np.int64(0), qmin=0, qmax=255, source=src.name, dynamic=True
            )
            rw.replace([dq], F.FakeQuant(name=dq.name, inputs=(dyn.inputs[0],), sources=(dq.sources[0],), given=g))
            if not rw.users(dyn.name):
                rw.nodes = [n for n in rw.nodes if n is not dyn]
                rw._index()
            return True
        if dq.positions != (0,):
            continue
        q = rw.onnx(dq.inputs[0], "QuantizeLinear")
        if q is None and _dequantize_before_moves(rw, dq):
            return True
        if q is None or q.positions != (0,):
            p = rw.prod.get(dq.inputs[0])
            via = (
                f" (it reads {p.op_type} of integer codes that no QuantizeLinear of the same per-tensor scale "
                "and zero point wrote: no faithful rewrite)"
                if isinstance(p, F.OnnxOp)
                else ""
            )
            raise dq.error(f"DequantizeLinear of an activation must read a QuantizeLinear of constant parameters{via}")
        src = rw.ctx.imp.prod[dq.inputs[0]]
        zp = q.operand(2)
        g = given_quant(src, q.operand(1), zp if isinstance(zp, np.ndarray) else None, None)
        if not _same_params(dq, g):
            raise dq.error("DequantizeLinear's scale or zero point differs from its QuantizeLinear's")
        rw.replace([dq], F.FakeQuant(name=dq.name, inputs=(q.inputs[0],), sources=(dq.sources[0],), given=g))
        if not rw.users(q.name) and q.name not in rw.outputs:
            rw.nodes = [n for n in rw.nodes if n is not q]
            rw._index()
        return True
    return False


def _dequantize_before_moves(rw: Rewriter, dq: F.OnnxOp) -> bool:
    """``DQ(move(Q(x)))`` with ``move`` a chain of data movement ops (Transpose, Reshape, ...,
    as onnxruntime's QOperator format moves int8 codes between quantized ops) is
    ``DQ(Q(move(DQ(Q(x)))))`` exactly, for a per-tensor scale: the chain is rewritten to move
    the dequantized value, with a fake_quant before it and the same one after it (the
    identity on moved codes, which the passes below treat as exact data movement or fuse
    into the linear that reads it). False when ``dq`` does not read such a chain."""
    from bbct.simulator.frontend.onnx_in import given_quant

    chain, t = [], dq.inputs[0]
    while True:
        p = rw.prod.get(t)
        if not (isinstance(p, F.OnnxOp) and p.positions[:1] == (0,)):
            return False
        if p.op_type == "QuantizeLinear":
            break
        if p.op_type not in MOVES or rw.users(p.name) != [chain[-1] if chain else dq]:
            return False
        chain.append(p)
        t = p.inputs[0]
    q = p
    if q.positions != (0,) or len(rw.users(q.name)) != 1:
        return False
    zp = q.operand(2)
    g = given_quant(rw.ctx.imp.prod[q.name], q.operand(1), zp if isinstance(zp, np.ndarray) else None, None)
    if np.asarray(g.scale).ndim or not _same_params(dq, g):
        return False
    fq = F.FakeQuant(name=q.name, inputs=(q.inputs[0],), sources=q.sources, given=g)
    # the moved value keeps the pair too (an exact one: it is on the grid already)
    fq2 = F.FakeQuant(name=dq.name, inputs=(chain[0].name,), sources=dq.sources, given=g)
    rw.nodes = [fq if n is q else fq2 if n is dq else n for n in rw.nodes]
    rw._index()
    return True


def _same_params(dq: F.OnnxOp, g: F.GivenQuant) -> bool:
    """``dq`` dequantizes with the scale and zero point of ``g`` (both constant; a missing
    zero point is 0, as ONNX defines it)."""
    scale, zp = dq.operand(1), dq.operand(2)
    if not isinstance(scale, np.ndarray) or isinstance(zp, str):
        return False
    zp = np.zeros(np.shape(g.zero_point), np.int64) if zp is None else zp.astype(np.int64)
    return np.array_equal(scale.astype(np.float32), g.scale) and np.array_equal(zp, np.asarray(g.zero_point, np.int64))


def _reads_given_weight(rw: Rewriter, u: F.FNode, x: str) -> bool:
    """``u`` is a MatMul/Gemm of ``x`` by a constant weight the model stores quantized."""
    return (
        isinstance(u, F.OnnxOp)
        and u.op_type in ("MatMul", "Gemm")
        and u.positions == (0,)
        and u.inputs[0] == x
        and rw.ctx.given(u.const_names.get(1, "")) is not None
    )


MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")  # data movement: codes stay codes


def _moved_codes(rw: Rewriter, n: F.FakeQuant) -> str | None:
    """The tensor whose codes ``n`` requantizes unchanged: ``n`` reads data movement
    (Reshape, Transpose, ...) of a tensor already on the same grid, so Q(DQ(codes)) is the
    identity and the movement of codes is exact. None otherwise."""
    t, ops = n.inputs[0], []
    while True:
        p = rw.prod.get(t)
        if isinstance(p, F.Embedding) and p.given is not None and not np.asarray(p.given.scale).ndim:
            ok = n.given.same_grid(p.given)  # a lookup of stored codes: already on the grid
            return f"{' + '.join(['Gather', *reversed(ops)])} of the stored codes of {p.table_name}" if ok else None
        if isinstance(p, F.FakeQuant):
            return f"{' + '.join(reversed(ops))} of the codes of {t}" if ops and n.given.same_grid(p.given) else None
        g = rw.ctx.imp.given_acts.get(t)
        if g is not None:
            return f"{' + '.join(reversed(ops))} of the codes of {t}" if ops and n.given.same_grid(g[0]) else None
        if not (isinstance(p, F.OnnxOp) and p.op_type in MOVES and p.positions[:1] == (0,)):
            return None
        ops.append(p.op_type)
        t = p.inputs[0]


def _grid_conflict(rw: Rewriter, n: F.FakeQuant) -> str | None:
    """Why recording ``n``'s grid on the tensor ``x`` it reads would change what another
    reader of ``x`` sees (lowering quantizes ``x`` itself, for every reader), or None when
    every reader of ``x`` reads it through the same grid: another given grid on ``x``, or a
    reader (or graph output) of ``x`` that reads it directly or through another grid. A
    reader that reads ``x`` directly after an earlier pair of the same grid on ``x`` was
    honoured read through that grid (it was checked then)."""
    x = n.inputs[0]
    have = rw.ctx.imp.given_acts.get(x)
    if have is not None:
        return None if have[0].same_grid(n.given) else f"{x} is given another grid too ({have[0].short()})"
    direct = [
        u.sources[0] if u.sources else u.name
        for u in rw.users(x)
        if u is not n and not (isinstance(u, F.FakeQuant) and not u.given.dynamic and u.given.same_grid(n.given))
    ]
    direct += ["the graph output"] if x in rw.outputs else []
    return f"{x} is also read by {', '.join(direct)} without this grid" if direct else None


def _give(rw: Rewriter, n: F.FakeQuant) -> bool:
    """Record ``n``'s given quantization on the tensor it reads (the graph output's name for
    an output), for lowering to honour at the node that keeps that name; False (nothing
    recorded) when another reader of the tensor does not read it through the same grid
    (:func:`_grid_conflict`): the value another reader sees never changes."""
    if _grid_conflict(rw, n) is not None:
        return False
    src = rw.ctx.imp.prod.get(n.inputs[0])
    rw.ctx.give(n.name if n.name in rw.outputs else n.inputs[0], n.given, src.name if src is not None else "")
    return True


def _drop_fake_quant(rw: Rewriter, late: bool) -> bool:
    for n in rw.nodes:
        if not isinstance(n, F.FakeQuant):
            continue
        users = rw.users(n.name)
        given = [u for u in users if _reads_given_weight(rw, u, n.name)]
        if not late and given:
            others = [u for u in users if u not in given]
            if not others and n.name not in rw.outputs:
                if not n.given.dynamic and n.inputs[0] not in rw.ctx.imp.given_acts:
                    _give(rw, n)  # the tensor's codes too, for a table over them (a GELU's output)
                continue  # kept: quant_linear honours it
            if others:  # e.g. a residual sum reading the quantized LayerNorm output
                # the others read the tensor's value at the given codes too, when it can be given
                if n.given.dynamic or not _give(rw, n):
                    why = "" if n.given.dynamic else f" ({_grid_conflict(rw, n)})"
                    rw.ctx.note(
                        n.name,
                        f"{n.given.short()} from {n.given.source}: honoured for the linear layers that read it; "
                        f"{', '.join(u.sources[0] if u.sources else u.name for u in others)} read it in bbct's "
                        f"format{why}",
                    )
                rw.nodes = [
                    replace(u, inputs=tuple(n.inputs[0] if i == n.name else i for i in u.inputs)) if u in others else u
                    for u in rw.nodes
                ]
                rw._index()
                return True
        moved = None if n.given.dynamic else _moved_codes(rw, n)
        if moved is not None:
            rw.ctx.imp.given_exact[n.name] = f"{n.given.short()} from {n.given.source}: exact, {moved} (same grid)"
        elif n.given.dynamic:
            rw.ctx.note(
                n.name,
                f"{n.given.short()} from {n.given.source}: a run-time float scale with no linear layer to take "
                "bbct's dynamic_quantize; bbct's config quantizes it",
            )
        elif not _give(rw, n):  # else honoured where the tensor is computed (late: a linear bbct quantizes reads it)
            rw.ctx.note(
                n.name,
                f"{n.given.short()} from {n.given.source}: {_grid_conflict(rw, n)}; bbct's config quantizes it",
            )
        rw.alias(n, n.inputs[0])
        return True
    return False


@pattern(
    "drop_fake_quant",
    "a fake_quant that no linear with a quantized weight reads: its given codes recorded on the tensor "
    "(lowering quantizes that tensor to them), or exact on moved codes",
)
def _drop_fake_quant_early(rw: Rewriter) -> bool:
    return _drop_fake_quant(rw, late=False)


@pattern("noop", "Identity, Dropout and float-to-float Cast are removed")
def _noop(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type in ("Identity", "Dropout", "Cast") and len(n.inputs) >= 1:
            if n.op_type == "Cast" and n.attributes.get("to") not in (1, 10, 11, 16):
                raise n.error("casts an activation to a non-float type")
            rw.alias(n, n.inputs[0])
            return True
        if (
            isinstance(n, F.OnnxOp)
            and n.op_type in VIEWS
            and n.positions[:1] == (0,)
            and all(rw.ctx.is_index(t) for t in n.inputs[1:])  # a computed target shape
            and _same_shape(rw, n)
        ):
            rw.alias(n, n.inputs[0])
            return True
    return False


VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand")


def _same_shape(rw: Rewriter, n: F.OnnxOp) -> bool:
    """A view whose output has its input's shape on both probes (a Reshape to the same shape)."""
    return all(rw.ctx.shape(n.name, k) == rw.ctx.shape(n.inputs[0], k) for k in (0, 1))


@pattern("batched_transpose", "Reshape (B,h,S,d)->(B*h,S,d) + Transpose(0,2,1) + Reshape ->(B,h,d,S): keys' transpose")
def _batched_transpose(rw: Rewriter) -> bool:
    for t in rw.nodes:
        if not (
            isinstance(t, F.OnnxOp) and t.op_type == "Transpose" and tuple(t.attributes.get("perm", ())) == (0, 2, 1)
        ):
            continue
        r1, r2 = rw.onnx(t.inputs[0], "Reshape"), rw.only_user(t.name)
        if r1 is None or rw.only_user(r1.name) is not t or not (isinstance(r2, F.OnnxOp) and r2.op_type == "Reshape"):
            continue
        ok = True
        for k in (0, 1):
            s4, s3, o4 = rw.ctx.shape(r1.inputs[0], k), rw.ctx.shape(r1.name, k), rw.ctx.shape(r2.name, k)
            ok = ok and len(s4) == 4 and s3 == (s4[0] * s4[1], s4[2], s4[3]) and o4 == (s4[0], s4[1], s4[3], s4[2])
        if ok:
            rw.replace(
                [r1, t, r2],
                F.OnnxOp(
                    name=r2.name,
                    inputs=(r1.inputs[0],),
                    sources=r1.sources + t.sources + r2.sources,
                    op_type="Transpose",
                    attributes={"perm": (0, 1, 3, 2)},
                    positions=(0,),
                ),
            )
            return True
    return False


# -- linear -------------------------------------------------------------------------------------
@pattern("linear", "MatMul(x, constant W) [+ Add(constant b)], Gemm(x, W, b) with transB -> linear")
def _linear(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not isinstance(n, F.OnnxOp) or n.op_type not in ("MatMul", "Gemm") or n.positions != (0,):
            continue
        w = n.operand(1)
        if not isinstance(w, np.ndarray) or w.ndim != 2:
            continue
        w_name = n.const_names.get(1, "")
        bias = None
        old: list[F.FNode] = [n]
        if n.op_type == "Gemm":
            a = n.attributes
            if a.get("transA", 0):
                raise n.error("Gemm with transA")
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            w = w.T if a.get("transB", 0) else w
            w = w * alpha if alpha != 1.0 else w
            c = n.operand(2)
            if isinstance(c, np.ndarray):
                bias = np.broadcast_to(c.astype(np.float64) * beta, (w.shape[1],)).astype(np.float32)
            elif c is not None:
                raise n.error("Gemm bias is not a constant")
        out = n.name
        u = rw.only_user(out)
        mid = None
        if bias is None and isinstance(u, F.OnnxOp) and u.op_type == "Add" and len(u.inputs) == 1:
            b = u.operand(1 - u.positions[0])
            if isinstance(b, np.ndarray) and b.size == w.shape[1] and b.shape[-1:] == (w.shape[1],):
                bias = b.reshape(-1).astype(np.float32)
                old.append(u)
                out = u.name
                g = rw.ctx.imp.given_acts.get(n.name)  # the product's given codes, before the bias
                mid = g[0] if g is not None and not g[0].dynamic else None
        rw.replace(
            old,
            F.Linear(
                name=out,
                inputs=(n.inputs[0],),
                sources=tuple(o.sources[0] for o in old),
                weight=np.asarray(w, np.float32),
                bias=bias,
                weight_name=w_name,
                w_given=_oriented_given(rw.ctx.given(w_name), np.asarray(w, np.float32)),
                mid_given=mid,
            ),
        )
        return True
    return False


def _oriented_given(g: F.GivenQuant | None, w: np.ndarray) -> F.GivenQuant | None:
    """The stored codes of a linear's weight ``w`` (K, N), transposed when the graph reads
    them through a Gemm's ``transB``; None when ``w`` is not their plain dequantization
    (a Gemm ``alpha``): then ``w``'s float values are quantized by the config."""
    if g is None:
        return None
    deq = g.dequantize()
    if deq.shape == w.shape and np.array_equal(deq, w):
        return g
    if deq.T.shape == w.shape and np.array_equal(deq.T, w):
        return g.transposed()
    return None


# -- layernorm ----------------------------------------------------------------------------------
@pattern("quant_linear", "fake_quant -> linear by a DequantizeLinear weight -> quant_linear (given quantization)")
def _quant_linear(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if type(n) is not F.Linear:
            continue
        fq = rw.prod.get(n.inputs[0])
        wq = n.w_given  # oriented (K, N) by the linear pattern; None: a scaled weight (Gemm alpha)
        if not isinstance(fq, F.FakeQuant) or wq is None or wq.block_size or np.any(np.asarray(wq.scale) < 0):
            continue  # blocked or negative weight scales: the given codes in bbct's block datapath (late drop of fq)
        if wq.axis is not None and wq.axis != 1:
            raise n.error("per-channel weight scales along the reduction axis are not supported")
        new = F.QuantLinear(
            name=n.name,
            inputs=(fq.inputs[0],),
            sources=n.sources,
            weight=n.weight,
            bias=n.bias,
            weight_name=n.weight_name,
            mid_given=n.mid_given,
            x_quant=fq.given,
            w_quant=wq,
        )
        if len(rw.users(fq.name)) == 1 and fq.name not in rw.outputs:
            rw.replace([fq, n], new)
        else:
            rw.replace([n], new)
        return True
    return False


@pattern(
    "drop_fake_quant_late",
    "a fake_quant left unfused (a scaled Gemm weight): its given codes recorded on the tensor, as above",
)
def _drop_fake_quant_late(rw: Rewriter) -> bool:
    return _drop_fake_quant(rw, late=True)


@pattern("layernorm", "LayerNormalization(axis=-1), or ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add]")
def _layernorm(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type == "LayerNormalization":
            ndim = len(rw.ctx.shape(n.inputs[0]))
            if n.attributes.get("axis", -1) not in (-1, ndim - 1):
                raise n.error("LayerNormalization over an axis other than the last")
            g, b = n.operand(1), n.operand(2)
            if not isinstance(g, np.ndarray):
                raise n.error("LayerNorm scale is not a constant")
            b = np.zeros_like(g) if b is None else b
            if not isinstance(b, np.ndarray):
                raise n.error("LayerNorm bias is not a constant")
            rw.replace(
                [n],
                F.LayerNorm(
                    name=n.name,
                    inputs=(n.inputs[0],),
                    sources=n.sources,
                    gamma=g.astype(np.float32),
                    beta=b.astype(np.float32),
                    eps=float(n.attributes.get("epsilon", 1e-5)),
                ),
            )
            return True
        if isinstance(n, F.OnnxOp) and n.op_type == "ReduceMean" and len(n.inputs) == 1:
            m = _decomposed_ln(rw, n)
            if m is not None:
                old, x, gamma, beta, eps, out = m
                rw.replace(
                    old,
                    F.LayerNorm(
                        name=out,
                        inputs=(x,),
                        sources=tuple(o.sources[0] for o in old),
                        gamma=gamma,
                        beta=beta,
                        eps=eps,
                    ),
                )
                return True
    return False


def _decomposed_ln(rw: Rewriter, mean: F.OnnxOp) -> tuple | None:
    x = mean.inputs[0]
    ndim = len(rw.ctx.shape(x))
    if not _last_axis(mean, ndim):
        return None
    sub = next((u for u in rw.users(mean.name) if isinstance(u, F.OnnxOp) and u.op_type == "Sub"), None)
    if sub is None or sub.operand(0) != x:
        return None
    d = sub.name
    pw = next((u for u in rw.users(d) if isinstance(u, F.OnnxOp) and u.op_type in ("Pow", "Mul")), None)
    div = next((u for u in rw.users(d) if isinstance(u, F.OnnxOp) and u.op_type == "Div"), None)
    if pw is None or div is None:
        return None
    if pw.op_type == "Pow" and _scalar(pw.operand(1)) != 2.0 or pw.op_type == "Mul" and pw.inputs != (d, d):
        return None
    var = rw.only_user(pw.name)
    if not (isinstance(var, F.OnnxOp) and var.op_type == "ReduceMean" and _last_axis(var, ndim)):
        return None
    add = rw.only_user(var.name)
    eps = _scalar(add.operand(1 - add.positions[0])) if isinstance(add, F.OnnxOp) and add.op_type == "Add" else None
    if eps is None:
        return None
    sq = rw.only_user(add.name)
    if not (isinstance(sq, F.OnnxOp) and sq.op_type == "Sqrt" and div.operand(1) == sq.name):
        return None
    old: list[F.FNode] = [mean, sub, pw, var, add, sq, div]
    out = div.name
    h = ndim and rw.ctx.shape(x)[-1]
    gamma, beta = np.ones(h, np.float32), np.zeros(h, np.float32)
    u = rw.only_user(out)
    if isinstance(u, F.OnnxOp) and u.op_type == "Mul" and len(u.inputs) == 1:
        g = u.operand(1 - u.positions[0])
        if isinstance(g, np.ndarray) and g.size == h:
            gamma, out = g.reshape(-1).astype(np.float32), u.name
            old.append(u)
            u = rw.only_user(out)
    if isinstance(u, F.OnnxOp) and u.op_type == "Add" and len(u.inputs) == 1:
        b = u.operand(1 - u.positions[0])
        if isinstance(b, np.ndarray) and b.size == h:
            beta, out = b.reshape(-1).astype(np.float32), u.name
            old.append(u)
    return old, x, gamma, beta, float(eps), out


# -- activations --------------------------------------------------------------------------------
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sqrt")


def gelu_float(x: np.ndarray, approximate: str) -> np.ndarray:
    """GELU in float64: erf form, or the tanh approximation."""
    from bbct.simulator.frontend.interp import gelu

    return gelu(x, approximate)


@pattern("gelu", "GELU: the Gelu op, or an element-wise region around Erf (erf form) or Tanh (tanh form)")
def _gelu(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type == "Gelu":
            rw.replace(
                [n],
                F.Gelu(
                    name=n.name,
                    inputs=n.inputs[:1],
                    sources=n.sources,
                    approximate=str(n.attributes.get("approximate", "none")),
                ),
            )
            return True
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type in ("Erf", "Tanh")):
            continue
        approx = "none" if n.op_type == "Erf" else "tanh"
        m = _unary_region(rw, n, lambda v, a=approx: gelu_float(v, a))
        if m is not None:
            region, x, y = m
            table_in, table = _region_table(rw, region, x, y)
            rw.replace(
                region,
                F.Gelu(
                    name=y,
                    inputs=(x,),
                    sources=tuple(r.sources[0] for r in region),
                    approximate=approx,
                    table_in=table_in,
                    table=table,
                ),
            )
            return True
    return False


REGION_OPS: dict[str, Callable[..., np.ndarray]] = {  # float32, as onnxruntime computes them
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
    "Sqrt": np.sqrt,
    "Tanh": np.tanh,
    "Erf": np.vectorize(math.erf, otypes=[np.float64]),
}
TABLE_MAX_CODES = 1 << 16  # a region on codes of up to 16 bits becomes one table


def _region_table(rw: Rewriter, region: list[F.FNode], x: str, y: str) -> tuple[F.GivenQuant | None, np.ndarray | None]:
    """When the model gives the codes of ``x``, ``y`` and of every tensor inside the
    element-wise region between them (and ``x`` has at most 2**16 codes), the output code for
    each input code: the region evaluated in float32 on every input code's value, each inner
    Q/DQ pair applied where the model has it. (None, None) otherwise."""
    given = rw.ctx.imp.given_acts
    gx, gy = (given.get(t, (None,))[0] for t in (x, y))
    if gx is None or gy is None or gx.dynamic or gy.dynamic or gx.qmax - gx.qmin >= TABLE_MAX_CODES:
        return None, None
    q = np.arange(gx.qmin, gx.qmax + 1)
    env = {x: ((q - int(gx.zero_point)).astype(np.float32) * np.float32(gx.scale)).astype(np.float32)}
    inside = {id(r) for r in region}
    for n in (r for r in rw.nodes if id(r) in inside):
        k = len(n.inputs) + len(n.consts)
        args = [n.operand(i) for i in range(k)]
        args = [env[a] if isinstance(a, str) else np.asarray(a, np.float32) for a in args]
        v = np.asarray(REGION_OPS[n.op_type](*args), np.float32)
        g = given.get(n.name, (None,))[0]
        if g is not None and n.name != y:
            v = np.asarray(g.fake_quant(v), np.float32)
        env[n.name] = v
    codes = np.clip(np.rint(env[y] / np.float32(gy.scale)) + int(gy.zero_point), gy.qmin, gy.qmax)
    return gx, codes.astype(np.int64)


def _unary_region(rw: Rewriter, anchor: F.OnnxOp, fn: Callable[[np.ndarray], np.ndarray]) -> tuple | None:
    """An element-wise region around ``anchor`` from one activation ``x`` to one output ``y``
    with ``y == fn(x)`` on the probe (float32 tolerance): (nodes, x, y) or None."""
    xs, stack, seen = [], [(anchor, 0)], set()
    while stack:  # candidate inputs: activations up to 6 element-wise ops behind the anchor
        node, depth = stack.pop()
        for t in node.inputs:
            p = rw.onnx(t, *ELEMENTWISE)
            if p is not None and depth < 6 and id(p) not in seen:
                seen.add(id(p))
                stack.append((p, depth + 1))
            if t not in xs and not rw.ctx.is_index(t):
                xs.append(t)
    ys, cur = [], anchor
    for _ in range(6):  # candidate outputs: along single consumers
        ys.append(cur.name)
        u = rw.only_user(cur.name)
        if not (isinstance(u, F.OnnxOp) and u.op_type in ELEMENTWISE):
            break
        cur = u
    for y in reversed(ys):
        yv = rw.ctx.probe_value(y)
        for x in xs:
            xv = rw.ctx.probe_value(x)
            if xv is None or yv is None or xv.shape != yv.shape:
                continue
            want = fn(np.asarray(xv, np.float64))
            err, tol = np.abs(want - yv).max(), 1e-5 * (1 + np.abs(want).max())
            if err > tol and not rw.ctx.imp.given_acts:
                continue
            region = _between(rw, x, y)
            if region is not None and err <= tol + _given_error(rw, region, xv):
                return region, x, y
    return None


def _given_error(rw: Rewriter, region: list[F.FNode], xv: np.ndarray) -> float:
    """How far a quantized model's probe of a region may stray from the float function: each
    given quantization inside it moves a value by up to half its scale, which the region
    scales by at most ``1 + max|x|``; 0 without any."""
    given = rw.ctx.imp.given_acts
    half_steps = sum(float(given[n.name][0].scale) / 2 for n in region if n.name in given)
    return half_steps * (1 + float(np.abs(xv).max()))


def _between(rw: Rewriter, x: str, y: str) -> list[F.FNode] | None:
    """Nodes on paths from ``x`` to ``y``, all element-wise ONNX ops whose outputs stay inside."""
    region: dict[int, F.FNode] = {}
    stack = [y]
    while stack:
        t = stack.pop()
        if t == x:
            continue
        p = rw.onnx(t, *ELEMENTWISE)
        if p is None:
            if rw.ctx.is_index(t) or t not in rw.prod:
                continue
            return None
        if id(p) in region:
            continue
        region[id(p)] = p
        stack.extend(p.inputs)
    inside = {n.name for n in region.values()}
    for n in region.values():
        if n.name != y and any(u.name not in inside for u in rw.users(n.name)):
            return None
    return list(region.values())


@pattern("tanh", "Tanh outside a GELU region")
def _tanh(rw: Rewriter) -> bool:
    return _unary(rw, "Tanh", F.Tanh)


@pattern("relu", "Relu")
def _relu(rw: Rewriter) -> bool:
    return _unary(rw, "Relu", F.Relu)


def _unary(rw: Rewriter, op_type: str, cls: type[F.FNode]) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type == op_type:
            rw.replace([n], cls(name=n.name, inputs=n.inputs, sources=n.sources))
            return True
    return False


# -- attention ------------------------------------------------------------------------------------
@pattern("split_heads", "Reshape (B,S,H)->(B,S,h,d) + Transpose(0,2,1,3) or (0,2,3,1); keys' Transpose(0,1,3,2)")
def _split_heads(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type == "Reshape"):
            continue
        x = n.inputs[0]
        sx, sy = rw.ctx.shape(x), rw.ctx.shape(n.name)
        if len(sx) != 3 or len(sy) != 4 or sy[:2] != sx[:2] or sy[2] * sy[3] != sx[2]:
            continue
        t = rw.only_user(n.name)
        if not (isinstance(t, F.OnnxOp) and t.op_type == "Transpose"):
            continue
        perm = tuple(t.attributes.get("perm", ()))
        if perm not in ((0, 2, 1, 3), (0, 2, 3, 1)):
            continue
        rw.replace(
            [n, t],
            F.SplitHeads(
                name=t.name, inputs=(x,), sources=n.sources + t.sources, num_heads=sy[2], transpose=perm == (0, 2, 3, 1)
            ),
        )
        return True
    for n in rw.nodes:  # keys transposed after the split
        if isinstance(n, F.OnnxOp) and n.op_type == "Transpose" and tuple(n.attributes.get("perm", ())) == (0, 1, 3, 2):
            s = rw.prod.get(n.inputs[0])
            if isinstance(s, F.SplitHeads) and not s.transpose and rw.only_user(s.name) is n:
                rw.replace([s, n], replace(s, name=n.name, transpose=True, sources=s.sources + n.sources))
                return True
    return False


@pattern("merge_heads", "Transpose(0,2,1,3) + Reshape (B,S,h,d)->(B,S,H)")
def _merge_heads(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type == "Transpose"):
            continue
        if tuple(n.attributes.get("perm", ())) != (0, 2, 1, 3) or len(rw.ctx.shape(n.name)) != 4:
            continue
        r = rw.only_user(n.name)
        if not (isinstance(r, F.OnnxOp) and r.op_type == "Reshape"):
            continue
        s4, s3 = rw.ctx.shape(n.name), rw.ctx.shape(r.name)
        if len(s3) != 3 or s3 != (s4[0], s4[1], s4[2] * s4[3]):
            continue
        rw.replace([n, r], F.MergeHeads(name=r.name, inputs=(n.inputs[0],), sources=n.sources + r.sources))
        return True
    return False


def _scale_chain(rw: Rewriter, t: str) -> tuple[str, float, list[F.FNode]]:
    """Walk back from ``t`` through Mul/Div by constant scalars (single consumers):
    (source tensor, product of the factors, the scale nodes)."""
    scale, nodes = 1.0, []
    while True:
        p = rw.onnx(t, "Mul", "Div")
        if p is None or len(p.inputs) != 1 or rw.only_user(p.name) is None:
            return t, scale, nodes
        c = _scalar(p.operand(1 - p.positions[0]))
        if c is None or (p.op_type == "Div" and p.positions[0] != 0):
            return t, scale, nodes
        scale *= c if p.op_type == "Mul" else 1.0 / c
        nodes.append(p)
        t = p.inputs[0]


@pattern(
    "scores",
    "MatMul(SplitHeads Q, SplitHeads K^T) with constant scales on Q, K (before or after the split) "
    "or on the product -> scores",
)
def _scores(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type == "MatMul" and len(n.inputs) == 2):
            continue
        sides = []
        for t, want_t in zip(n.inputs, (False, True), strict=True):
            src, sc, nodes = _scale_chain(rw, t)
            head = rw.prod.get(src)
            if not (isinstance(head, F.SplitHeads) and head.transpose == want_t):
                break
            pre, sc2, nodes2 = _scale_chain(rw, head.inputs[0])  # a scale before the split
            if nodes2 and all(rw.only_user(m.name) is not None for m in nodes2):
                head = replace(head, inputs=(pre,))
                sc *= sc2
                nodes = nodes + nodes2
            sides.append((head, sc, nodes))
        if len(sides) != 2:
            continue
        scale = sides[0][1] * sides[1][1]
        old: list[F.FNode] = [n]
        out = n.name
        while True:  # scales after the product
            u = rw.only_user(out)
            c = _scalar(u.operand(1 - u.positions[0])) if isinstance(u, F.OnnxOp) and len(u.inputs) == 1 else None
            if c is None or u.op_type not in ("Mul", "Div") or (u.op_type == "Div" and u.positions[0] != 0):
                break
            scale *= c if u.op_type == "Mul" else 1.0 / c
            old.append(u)
            out = u.name
        for head, _, nodes in sides:
            for m in nodes:  # scale nodes vanish; re-point the split to the unscaled tensor
                rw.nodes = [x for x in rw.nodes if x is not m]
            rw.nodes = [head if (isinstance(x, F.SplitHeads) and x.name == head.name) else x for x in rw.nodes]
        rw._index()
        rw.replace(
            old,
            F.Scores(
                name=out,
                inputs=(sides[0][0].name, sides[1][0].name),
                sources=tuple(o.sources[0] for o in old),
                scale=float(scale),
            ),
        )
        return True
    return False


@pattern(
    "softmax",
    "Softmax(last axis) of scores + additive index mask, or Where(index mask, scores, -big), "
    "[+ Where(IsNaN(p), 0, p) guard, removed]",
)
def _softmax(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type == "Softmax"):
            continue
        ndim = len(rw.ctx.shape(n.name))
        if n.attributes.get("axis", -1) not in (-1, ndim - 1):
            raise n.error("Softmax over an axis other than the last")
        old: list[F.FNode] = [n]
        x = n.inputs[0]
        kind, value, mask = "none", 0.0, None
        a = rw.onnx(x, "Add")
        w = rw.onnx(x, "Where")
        if a is not None and len(a.inputs) == 2 and rw.only_user(a.name) is n:
            i = next((k for k, t in enumerate(a.inputs) if rw.ctx.is_index(t)), None)
            if i is not None:
                mask, x = a.inputs[i], a.inputs[1 - i]
                vals = np.unique(rw.ctx.probe_value(mask))
                neg = vals[vals < 0]
                if not (len(neg) == 1 and set(vals) <= {0.0, float(neg[0])} and neg[0] <= -1e3):
                    raise a.error(f"additive attention mask takes values {vals[:4]}: expected 0 and one large negative")
                kind, value = "add", float(neg[0])
                old.append(a)
        elif w is not None and rw.only_user(w.name) is n:
            cond = w.operand(0)
            t_true, t_false = w.operand(1), w.operand(2)
            if isinstance(cond, str) and rw.ctx.is_index(cond):
                for v, s, k in ((t_true, t_false, "where_true"), (t_false, t_true, "where_false")):
                    c = _scalar(v)
                    if c is not None and isinstance(s, str) and c <= -1e3:
                        kind, value, mask, x = k, c, cond, s
                        old.append(w)
                        break
        out = n.name
        for g in list(rw.users(out)):  # Where(IsNaN(p), 0, p): a guard no finite mask needs
            if isinstance(g, F.OnnxOp) and g.op_type == "IsNaN":
                wg = rw.only_user(g.name)
                if isinstance(wg, F.OnnxOp) and wg.op_type == "Where" and wg.operand(2) == out:
                    old += [g, wg]
                    out = wg.name
        if kind == "none" and old[1:]:
            kind = "none"
        inputs = (x,) if mask is None else (x, mask)
        rw.replace(
            old,
            F.Softmax(
                name=out, inputs=inputs, sources=tuple(o.sources[0] for o in old), mask_kind=kind, mask_value=value
            ),
        )
        return True
    return False


@pattern("context", "MatMul(softmax output, SplitHeads V) -> matmul")
def _context(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type == "MatMul" and len(n.inputs) == 2:
            p, v = (rw.prod.get(t) for t in n.inputs)
            if isinstance(p, F.Softmax) and isinstance(v, F.SplitHeads) and not v.transpose:
                rw.replace([n], F.MatMul(name=n.name, inputs=n.inputs, sources=n.sources))
                return True
    return False


# -- pooling and heads ----------------------------------------------------------------------------
@pattern("take_row", "Gather(x, 0, axis=1), or Slice(x, 0:1, axis=1) [+ Squeeze/Reshape] -> the first token")
def _take_row(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not isinstance(n, F.OnnxOp) or len(n.inputs) != 1 or len(rw.ctx.shape(n.inputs[0])) != 3:
            continue
        x = n.inputs[0]
        if n.op_type == "Gather" and n.attributes.get("axis", 0) == 1 and _scalar(n.operand(1)) == 0.0:
            if np.ndim(n.operand(1)) == 0:
                rw.replace([n], F.TakeRow(name=n.name, inputs=(x,), sources=n.sources))
                return True
        if n.op_type == "Slice" and rw.ctx.shape(n.name)[1] == 1:
            st, en, ax = (n.operand(k) for k in (1, 2, 3))
            if _scalar(st) == 0.0 and _scalar(en) == 1.0 and (ax is None or _scalar(ax) in (1.0,)):
                u = rw.only_user(n.name)
                if (
                    isinstance(u, F.OnnxOp)
                    and u.op_type in ("Squeeze", "Reshape", "Flatten")
                    and len(rw.ctx.shape(u.name)) == 2
                ):
                    rw.replace([n, u], F.TakeRow(name=u.name, inputs=(x,), sources=n.sources + u.sources))
                    return True
    return False


def _is_mask_of(rw: Rewriter, t: str, mask_input: str) -> bool:
    """``t`` is the attention mask, broadcast to (B, S, 1|H), on both probes."""
    for k in (0, 1):
        v, m = rw.ctx.probe_value(t, k), rw.ctx.probe_value(mask_input, k)
        if v is None or m is None or v.ndim != 3 or v.shape[:2] != m.shape:
            return False
        if not np.array_equal(v, np.broadcast_to(m[:, :, None].astype(v.dtype), v.shape)):
            return False
    return True


@pattern("mean_pool", "ReduceSum(x * mask, seq) / Clip|Max(ReduceSum(mask, seq), eps) -> mean over unmasked tokens")
def _mean_pool(rw: Rewriter) -> bool:
    mask_in = next((k for k, v in rw.ctx.imp.roles.items() if v == "attention_mask"), None)
    if mask_in is None:
        return False
    for n in rw.nodes:
        if not (
            isinstance(n, F.OnnxOp)
            and n.op_type == "Div"
            and n.positions == (0,)
            or (isinstance(n, F.OnnxOp) and n.op_type == "Div" and len(n.inputs) == 2)
        ):
            continue
        rs = rw.onnx(n.inputs[0], "ReduceSum")
        if rs is None or _axes(rs) != (1,) or rs.attributes.get("keepdims", 1) != 0:
            continue
        mul = rw.onnx(rs.inputs[0], "Mul")
        if mul is None or len(mul.inputs) != 2:
            continue
        i = next((k for k, t in enumerate(mul.inputs) if rw.ctx.is_index(t)), None)
        if i is None or not _is_mask_of(rw, mul.inputs[i], mask_in):
            continue
        x = mul.inputs[1 - i]
        # the denominator is index (count of tokens, clamped): check it equals max(count, eps)
        den = n.inputs[1] if len(n.inputs) == 2 else None
        ok = den is not None and rw.ctx.is_index(den)
        for k in (0, 1):
            if not ok:
                break
            m = rw.ctx.probe_value(mask_in, k).astype(np.float64)
            got = np.asarray(rw.ctx.probe_value(den, k), np.float64)
            ok = got.shape[0] == m.shape[0] and np.allclose(np.broadcast_to(m.sum(1)[:, None], got.shape), got)
        if not ok:
            raise n.error("mean pooling whose denominator is not the count of unmasked tokens")
        rw.replace(
            [mul, rs, n], F.MeanPool(name=n.name, inputs=(x, mask_in), sources=mul.sources + rs.sources + n.sources)
        )
        return True
    return False


@pattern("l2_normalize", "Div(x, Expand?(Clip|Max(ReduceL2(x) or Sqrt(ReduceSum(x*x)), eps))) -> L2 normalization")
def _l2(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not (isinstance(n, F.OnnxOp) and n.op_type == "Div" and len(n.inputs) == 2):
            continue
        x, den = n.inputs
        chain: list[F.FNode] = []
        t = den
        e = rw.onnx(t, "Expand")
        if e is not None:
            chain.append(e)
            t = e.inputs[0]
        c = rw.onnx(t, "Clip", "Max")
        eps = 0.0
        if c is not None:
            lo = c.operand(1)
            eps = _scalar(lo) if _scalar(lo) is not None else _scalar(c.attributes.get("min")) or 0.0
            chain.append(c)
            t = c.inputs[0]
        r = rw.onnx(t, "ReduceL2")
        if r is not None and r.inputs == (x,):
            chain.append(r)
        else:
            sq = rw.onnx(t, "Sqrt")
            rs = rw.onnx(sq.inputs[0], "ReduceSum") if sq is not None else None
            p = rw.onnx(rs.inputs[0], "Mul", "Pow") if rs is not None else None
            if p is None or not (p.inputs == (x, x) or p.op_type == "Pow" and p.inputs == (x,)):
                continue
            chain += [sq, rs, p]
        rw.replace(chain + [n], F.L2Normalize(name=n.name, inputs=(x,), sources=n.sources, eps=float(eps)))
        return True
    return False


# -- sums -----------------------------------------------------------------------------------------
@pattern("add", "Add of two activations -> add")
def _add(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if isinstance(n, F.OnnxOp) and n.op_type == "Add" and len(n.inputs) == 2:
            if not any(rw.ctx.is_index(t) for t in n.inputs):
                rw.replace([n], F.Add(name=n.name, inputs=n.inputs, sources=n.sources))
                return True
    return False


@pattern("embedding_sum", "Add tree of Embedding lookups -> one embedding_sum (largest table first)")
def _embedding_sum(rw: Rewriter) -> bool:
    for n in rw.nodes:
        if not isinstance(n, F.Add):
            continue
        leaves, adds, ok, stack = [], [n], True, list(n.inputs)
        while stack:
            t = stack.pop()
            p = rw.prod.get(t)
            if isinstance(p, F.Embedding) and rw.only_user(t) is not None:
                leaves.append(p)
            elif isinstance(p, F.Add) and rw.only_user(t) is not None:
                adds.append(p)
                stack.extend(p.inputs)
            else:
                ok = False
        if not ok or len(leaves) < 2:
            continue
        u = rw.only_user(n.name)
        if isinstance(u, F.Add) and all(isinstance(rw.prod.get(t), (F.Embedding, F.Add)) for t in u.inputs):
            continue  # the root of the tree is further down
        chain = _add_chain(rw, n) if any(a.name in rw.ctx.imp.given_acts for a in adds[1:]) else None
        if chain is not None:  # a given partial sum: the graph's order of adds
            leaves, partials = chain
        else:
            leaves.sort(key=lambda e: -e.table.shape[0])  # stable: graph order among equal sizes
            partials = ()
        rw.replace(
            leaves + adds,
            F.EmbeddingSum(
                name=n.name,
                inputs=tuple(e.inputs[0] for e in leaves),
                sources=tuple(e.sources[0] for e in leaves + adds),
                tables=tuple(e.table for e in leaves),
                table_names=tuple(e.table_name for e in leaves),
                givens=tuple(e.given for e in leaves),
                partial_names=partials,
            ),
        )
        return True
    return False


def _add_chain(rw: Rewriter, n: F.Add) -> tuple[list[F.Embedding], tuple[str, ...]] | None:
    """A left-deep tree ``((l0 + l1) + l2) + ...`` of lookups: the leaves in order and the
    partial sums' names (all but the root), or None for another shape."""
    p = [rw.prod.get(t) for t in n.inputs]
    if all(isinstance(x, F.Embedding) for x in p):
        return list(p), ()
    inner = [x for x in p if isinstance(x, F.Add)]
    leaf = [x for x in p if isinstance(x, F.Embedding)]
    if len(inner) != 1 or len(leaf) != 1:
        return None
    sub = _add_chain(rw, inner[0])
    return None if sub is None else ([*sub[0], leaf[0]], (*sub[1], inner[0].name))


def run_patterns(nodes: list[F.FNode], ctx: object) -> list[F.FNode]:
    """Apply every registered pass, in order, each until it no longer matches."""
    rw = Rewriter(list(nodes), ctx, tuple(o.name for o in ctx.imp.model.graph.output))  # type: ignore[attr-defined]
    for p in PATTERNS.values():
        for _ in range(100000):
            if not p.fn(rw):
                break
        else:  # pragma: no cover - a pass that never stops is a bug
            raise UnsupportedGraphError(f"pattern {p.name} does not converge")
    return rw.nodes


def describe_patterns() -> dict[str, str]:
    return {k: p.describes for k, p in PATTERNS.items()}
