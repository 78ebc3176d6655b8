"""The typed, family-neutral float graph: what an ONNX encoder computes, before integers.

The importer (:mod:`bbct.simulator.frontend.onnx_in`) turns every ONNX node on the activation
path into a node of this graph (first :class:`OnnxOp`, the op as ONNX states it), then the
pattern passes (:mod:`bbct.simulator.frontend.patterns`) fuse what hardware computes as one
unit into typed nodes (:class:`Linear`, :class:`LayerNorm`, :class:`Gelu`, ...). Lowering only
accepts typed nodes: an :class:`OnnxOp` left after the passes is an unsupported construct.

Three kinds of value flow in an encoder graph, and the graph keeps them apart:

* **constants** (weights, folded shape arithmetic) live on the nodes that use them;
* **index tensors** depend only on the integer graph inputs and on sizes: token ids, position
  ids (``arange`` or RoBERTa's ``CumSum`` over ``input_ids != pad``), token types, attention
  masks. They are computed at run time, exactly as the graph computes them, by the graph's own
  index subgraph (:class:`IndexGraph`), never assumed;
* **activations** (float tensors downstream of an embedding lookup): the nodes of this graph.

Every node has one output, named by the ONNX tensor it stands for, so the float interpreter,
calibration, the integer IR and the comparison with onnxruntime all key on the same names.
Weights are float32 arrays as stored; ``Linear.weight`` is ``(in, out)`` (``y = x @ W + b``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from bbct.simulator.errors import UnsupportedGraphError

NODE_TYPES: dict[str, type[FNode]] = {}


def _register(cls: type[FNode]) -> type[FNode]:
    NODE_TYPES[cls.op] = cls
    return cls


@dataclass(frozen=True, eq=False)
class FNode:
    """Base: ``name`` is the output tensor; ``inputs`` activation or index tensor names;
    ``sources`` the ONNX node names this node stands for (for messages)."""

    name: str
    inputs: tuple[str, ...]
    sources: tuple[str, ...] = ()
    op: ClassVar[str] = "node"
    arity: ClassVar[int | None] = 1
    describes: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.arity is not None and len(self.inputs) != self.arity:
            raise self.error(f"takes {self.arity} input(s), got {len(self.inputs)}")
        self.validate()

    def validate(self) -> None:
        """Subclasses check their attributes here (raise :meth:`error`)."""

    def error(self, msg: str) -> UnsupportedGraphError:
        src = self.sources[0] if self.sources else self.name
        return UnsupportedGraphError(f"node {src!r} ({self.op}): {msg}")

    def attrs(self) -> str:
        return ""

    def line(self) -> str:
        return f"{self.name} = {self.op}({', '.join(self.inputs)}) {self.attrs()}".rstrip()


@_register
@dataclass(frozen=True, eq=False)
class OnnxOp(FNode):
    """An ONNX op on the activation path not (yet) fused: ``op_type``, attributes, and the
    constant inputs by position (``consts``); the other inputs are tensors in ``inputs``."""

    op_type: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    const_names: dict[int, str] = field(default_factory=dict)  # initializer names (shared weights)
    positions: tuple[int, ...] = ()  # ONNX input position of each name in ``inputs``
    op: ClassVar[str] = "onnx"
    arity: ClassVar[int | None] = None

    def operand(self, pos: int) -> str | np.ndarray | None:
        """ONNX input ``pos``: a tensor name, a constant array, or None if absent."""
        if pos in self.consts:
            return self.consts[pos]
        if pos in self.positions:
            return self.inputs[self.positions.index(pos)]
        return None

    def error(self, msg: str) -> UnsupportedGraphError:
        src = self.sources[0] if self.sources else self.name
        return UnsupportedGraphError(f"node {src!r} ({self.op_type}): {msg}")

    def attrs(self) -> str:
        c = ", ".join(f"#{k}={np.shape(v)}" for k, v in self.consts.items())
        return f"{self.op_type} {self.attributes or ''} {c}".rstrip()


@_register
@dataclass(frozen=True, eq=False)
class Embedding(FNode):
    """``table[ids]``: rows of a float table (vocab, hidden) gathered by an index tensor."""

    table: np.ndarray | None = None
    table_name: str = ""
    given: GivenQuant | None = None  # the table's stored codes (a DequantizeLinear of an initializer)
    op: ClassVar[str] = "embedding"
    describes: ClassVar[str] = "Gather of a constant 2-D table by an index tensor (word, position, token type)"

    def validate(self) -> None:
        if self.table is None or self.table.ndim != 2:
            raise self.error("table must be 2-D")

    def attrs(self) -> str:
        return f"table={self.table.shape}"


@_register
@dataclass(frozen=True, eq=False)
class EmbeddingSum(FNode):
    """Sum of several embedding lookups (one index tensor per table), the order of the
    integer adds fixed: largest table first (word, position, token type in BERT), or the
    graph's own order when the model gives a partial sum's quantization: ``partial_names``
    then names the tensor of each partial sum (tables 0..k, k >= 1) but the last."""

    tables: tuple[np.ndarray, ...] = ()
    table_names: tuple[str, ...] = ()
    givens: tuple[GivenQuant | None, ...] = ()  # per table, as Embedding.given (empty: none given)
    partial_names: tuple[str, ...] = ()
    op: ClassVar[str] = "embedding_sum"
    arity: ClassVar[int | None] = None
    describes: ClassVar[str] = "Add tree of two or more Embedding lookups"

    def validate(self) -> None:
        if len(self.tables) != len(self.inputs) or len(self.tables) < 2:
            raise self.error("needs one index input per table, at least two")
        if len({t.shape[1] for t in self.tables}) != 1:
            raise self.error(f"tables of different widths {[t.shape for t in self.tables]}")

    def attrs(self) -> str:
        return "tables=" + ",".join(str(t.shape) for t in self.tables)


@_register
@dataclass(frozen=True, eq=False)
class Linear(FNode):
    """``x @ weight + bias`` over the last axis; ``weight_name`` keys shared weights (ALBERT).
    ``w_given``: the weight's stored codes and scales, oriented (K, N), when the model stores
    it quantized (a DequantizeLinear of an initializer): lowering uses them as they are.
    ``mid_given``: the given quantization of the product ``x @ weight`` before the bias (a
    Q/DQ pair between the MatMul and the bias Add): lowering quantizes the product to those
    codes, then adds the bias (``bias_add``)."""

    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    weight_name: str = ""
    w_given: GivenQuant | None = None
    mid_given: GivenQuant | None = None
    op: ClassVar[str] = "linear"
    describes: ClassVar[str] = "MatMul by a constant 2-D weight [+ Add constant bias], or Gemm (transB handled)"

    def validate(self) -> None:
        if self.weight is None or self.weight.ndim != 2:
            raise self.error("weight must be 2-D")
        if self.bias is not None and self.bias.shape != (self.weight.shape[1],):
            raise self.error(f"bias shape {self.bias.shape} for weight {self.weight.shape}")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def attrs(self) -> str:
        given = f" given w:{self.w_given.short()}" if self.w_given is not None else ""
        given += f" given x@W:{self.mid_given.short()}" if self.mid_given is not None else ""
        return f"W={self.weight.shape}{' +b' if self.bias is not None else ''}{given}"


@dataclass(frozen=True, eq=False)
class GivenQuant:
    """Quantization parameters a quantizer wrote into the model (ONNX ``QuantizeLinear`` /
    ``DequantizeLinear``): ``value = (code - zero_point) * scale``, codes in ``qmin..qmax``.

    ``scale`` and ``zero_point`` are scalars, 1-D along ``axis`` (per channel), or, with
    ``block_size`` > 0, of the codes' rank with ``ceil(n / block_size)`` blocks along ``axis``
    (opset 21 blocked scales); ``codes`` holds the stored integers of a constant (a weight)
    and is None for an activation.
    ``source`` names the ONNX node that states them (for the report)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None
    codes: np.ndarray | None = None
    source: str = ""
    block_size: int = 0
    dynamic: bool = False  # DynamicQuantizeLinear: uint8, scale and zero point from the tensor at run time

    @property
    def bits(self) -> int:
        return int(self.qmax - self.qmin).bit_length()

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def short(self) -> str:
        if self.dynamic:
            return "u8 dynamic (scale and zero point of the whole tensor at run time)"
        s = np.asarray(self.scale)
        kind = f"per-channel[{s.size}]" if s.ndim else f"scale={float(s):.6g} zp={int(self.zero_point)}"
        if self.block_size:
            kind = f"blocks of {self.block_size} along axis {self.axis} [{s.size} scales]"
        return f"{'s' if self.signed else 'u'}{self.bits} {kind}"

    def per_element(self, v: np.ndarray) -> np.ndarray:
        """A per-tensor, per-channel or per-block parameter (scale, zero point) broadcast to
        the codes' shape."""
        v, shape = np.asarray(v), self.codes.shape
        if self.block_size:
            v = np.repeat(v, self.block_size, axis=self.axis)
            return v[tuple(slice(0, d) for d in shape)]
        if v.ndim:
            return np.broadcast_to(v.reshape([-1 if k == self.axis else 1 for k in range(len(shape))]), shape)
        return np.broadcast_to(v, shape)

    def dequantize(self) -> np.ndarray:
        """The stored constant's float value as ``DequantizeLinear`` computes it (float32)."""
        z = self.per_element(self.zero_point).astype(np.int64)
        return ((self.codes - z).astype(np.float32) * self.per_element(self.scale).astype(np.float32)).astype(
            np.float32
        )

    def same_grid(self, other: GivenQuant | None) -> bool:
        """Both static with equal scale, zero point and range: equal codes for equal values,
        so quantizing one's values to the other is the identity on codes."""
        return (
            other is not None
            and not self.dynamic
            and not other.dynamic
            and (self.qmin, self.qmax) == (other.qmin, other.qmax)
            and np.array_equal(np.asarray(self.scale, np.float32), np.asarray(other.scale, np.float32))
            and np.array_equal(np.asarray(self.zero_point, np.int64), np.asarray(other.zero_point, np.int64))
        )

    def transposed(self) -> GivenQuant:
        """The same quantization of the transposed 2-D constant (a Gemm's ``transB``)."""
        t = (lambda v: np.asarray(v).T) if self.block_size else (lambda v: v)
        return replace(
            self,
            codes=np.ascontiguousarray(self.codes.T),
            scale=t(self.scale),
            zero_point=t(self.zero_point),
            axis=None if self.axis is None else 1 - self.axis % 2,
        )

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        """``DequantizeLinear(QuantizeLinear(x))`` as onnxruntime computes it in float32:
        ``x / scale`` rounded half to even, plus the zero point, clipped, then scaled back."""
        if self.dynamic:
            return dynamic_fake_quant(x)
        s, z = np.float32(self.scale), np.asarray(self.zero_point, np.float32)
        q = np.clip(np.rint(np.asarray(x, np.float32) / s) + z, self.qmin, self.qmax)
        return ((q - z) * s).astype(np.float64)


def dynamic_fake_quant(x: np.ndarray, pow2: bool = False) -> np.ndarray:
    """``DequantizeLinear(DynamicQuantizeLinear(x))`` as onnxruntime computes it in float32:
    ``scale = (max(x, 0) - min(x, 0)) / 255`` over the whole tensor, ``zp = round(-min / scale)``.
    ``pow2``: the scale rounded up to a power of two, the float model of bbct's integer scheme
    (:func:`bbct.kernels.affine.dynamic_quantize`), to measure what that choice costs."""
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(min(0.0, float(x.min()))), np.float32(max(0.0, float(x.max())))
    s = np.float32((hi - lo) / np.float32(255))
    if s == 0:
        return np.zeros(x.shape)
    if pow2:
        s = np.float32(2.0 ** np.ceil(np.log2((float(hi) - float(lo)) / 255)))
    z = np.clip(np.rint(-lo / s), 0, 255)
    q = np.clip(np.rint(x / s) + z, 0, 255)
    return ((q - z) * s).astype(np.float64)


@_register
@dataclass(frozen=True, eq=False)
class FakeQuant(FNode):
    """``DequantizeLinear(QuantizeLinear(x))`` of an activation with the given parameters."""

    given: GivenQuant | None = None
    op: ClassVar[str] = "fake_quant"
    describes: ClassVar[str] = "QuantizeLinear -> DequantizeLinear pair on an activation (given scale, zero point)"

    def validate(self) -> None:
        if self.given is None or np.asarray(self.given.scale).ndim != 0:
            raise self.error("an activation's quantization must be per tensor (one scale, one zero point)")

    def attrs(self) -> str:
        return self.given.short()


@_register
@dataclass(frozen=True, eq=False)
class QuantLinear(Linear):
    """A linear layer whose input and weight quantization the model gives: ``x`` is
    quantized with ``x_quant`` (per tensor), the weight is ``w_quant.codes`` (K, N) with
    per-tensor or per-output-channel (``axis=1``) scales; ``bias`` stays float: lowering
    quantizes it at the accumulator's scale ``s_x * s_w``, which recovers the int32 codes of
    a bias the quantizer stored that way (onnxruntime's ``Gemm``)."""

    x_quant: GivenQuant | None = None
    w_quant: GivenQuant | None = None
    op: ClassVar[str] = "quant_linear"
    describes: ClassVar[str] = "a linear layer whose input and weight come through QuantizeLinear/DequantizeLinear"

    def validate(self) -> None:
        super().validate()
        if self.x_quant is None or self.w_quant is None or self.w_quant.codes is None:
            raise self.error("needs the input's and the weight's given quantization")
        if self.w_quant.codes.shape != self.weight.shape:
            raise self.error(f"weight codes {self.w_quant.codes.shape} for weight {self.weight.shape}")
        if np.asarray(self.w_quant.scale).ndim and self.w_quant.axis != 1:
            raise self.error("per-channel weight scales must be along the output channels")

    def attrs(self) -> str:
        return f"{super().attrs()} x:{self.x_quant.short()} w:{self.w_quant.short()}"


@_register
@dataclass(frozen=True, eq=False)
class Add(FNode):
    """Sum of two activations of one shape (residual)."""

    op: ClassVar[str] = "add"
    arity: ClassVar[int | None] = 2
    describes: ClassVar[str] = "Add of two activations (residual connections)"


@_register
@dataclass(frozen=True, eq=False)
class LayerNorm(FNode):
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the last axis."""

    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    eps: float = 1e-12
    op: ClassVar[str] = "layernorm"
    describes: ClassVar[str] = "LayerNormalization, or ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add]"

    def validate(self) -> None:
        if self.gamma is None or self.beta is None or self.gamma.shape != self.beta.shape:
            raise self.error("gamma and beta must be 1-D of one size")
        if not (np.isfinite(self.eps) and self.eps >= 0):
            raise self.error(f"eps={self.eps} must be finite and >= 0")


@_register
@dataclass(frozen=True, eq=False)
class Gelu(FNode):
    """GELU: ``approximate`` "none" (x * Phi(x), erf form) or "tanh". ``table_in`` and
    ``table``: when the model gives the codes of the region's input, output and inner
    tensors, the output code ``q`` for every input code ``qmin..qmax`` of ``table_in``, the
    region evaluated as the model computes it (lowering then looks the codes up)."""

    approximate: str = "none"
    table_in: GivenQuant | None = None
    table: np.ndarray | None = None
    op: ClassVar[str] = "gelu"
    describes: ClassVar[str] = "GELU: Erf form, tanh approximation, or the Gelu op (opset 20)"

    def validate(self) -> None:
        if self.approximate not in ("none", "tanh"):
            raise self.error(f"approximate={self.approximate!r}")

    def attrs(self) -> str:
        return self.approximate


@_register
@dataclass(frozen=True, eq=False)
class Tanh(FNode):
    op: ClassVar[str] = "tanh"
    describes: ClassVar[str] = "Tanh (pooler, RoBERTa classification head)"


@_register
@dataclass(frozen=True, eq=False)
class Relu(FNode):
    op: ClassVar[str] = "relu"
    describes: ClassVar[str] = "Relu (DistilBERT classification head, ReLU feed-forward)"


@_register
@dataclass(frozen=True, eq=False)
class SplitHeads(FNode):
    """(B, S, H) -> (B, heads, S, d), or (B, heads, d, S) when ``transpose`` (keys)."""

    num_heads: int = 1
    transpose: bool = False
    op: ClassVar[str] = "split_heads"
    describes: ClassVar[str] = "Reshape (B,S,H)->(B,S,h,d) then Transpose to (B,h,S,d) or (B,h,d,S)"

    def validate(self) -> None:
        if self.num_heads < 1:
            raise self.error(f"num_heads={self.num_heads}")

    def attrs(self) -> str:
        return f"heads={self.num_heads}{' T' if self.transpose else ''}"


@_register
@dataclass(frozen=True, eq=False)
class MergeHeads(FNode):
    """(B, heads, S, d) -> (B, S, heads * d)."""

    op: ClassVar[str] = "merge_heads"
    describes: ClassVar[str] = "Transpose (B,h,S,d)->(B,S,h,d) then Reshape to (B,S,H)"


@_register
@dataclass(frozen=True, eq=False)
class Scores(FNode):
    """Attention scores ``(q @ k) * scale`` of split heads: q (B,h,S,d), k (B,h,d,S)."""

    scale: float = 1.0
    op: ClassVar[str] = "scores"
    arity: ClassVar[int | None] = 2
    describes: ClassVar[str] = "MatMul of split Q and transposed K, scaled by constants on Q, K or the product"

    def validate(self) -> None:
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise self.error(f"scale={self.scale} must be finite and > 0")

    def attrs(self) -> str:
        return f"scale={self.scale:.6g}"


@_register
@dataclass(frozen=True, eq=False)
class Softmax(FNode):
    """Softmax over the last axis of ``scores`` with an optional mask (second input).

    The mask is an index tensor broadcastable to the scores. ``mask_kind`` says how it acts:
    ``"add"``: its values are added (0 keeps, a large negative value masks); ``"where_true"``
    / ``"where_false"``: a boolean whose True / False elements are replaced by ``mask_value``.
    ``mask_value`` is the additive or replacement value of a masked element."""

    mask_kind: str = "none"
    mask_value: float = 0.0
    op: ClassVar[str] = "softmax"
    arity: ClassVar[int | None] = None
    describes: ClassVar[str] = "Softmax(last axis) of scores + additive mask, or of Where(mask, scores, -big)"

    def validate(self) -> None:
        want = 1 if self.mask_kind == "none" else 2
        if len(self.inputs) != want or self.mask_kind not in ("none", "add", "where_true", "where_false"):
            raise self.error(f"mask_kind={self.mask_kind!r} with {len(self.inputs)} inputs")

    def attrs(self) -> str:
        return f"mask={self.mask_kind}" + (f"({self.mask_value:.3g})" if self.mask_kind != "none" else "")


@_register
@dataclass(frozen=True, eq=False)
class MatMul(FNode):
    """Product of two activations: probabilities (B,h,S,S) by values (B,h,S,d)."""

    op: ClassVar[str] = "matmul"
    arity: ClassVar[int | None] = 2
    describes: ClassVar[str] = "MatMul of attention probabilities by split V"


@_register
@dataclass(frozen=True, eq=False)
class TakeRow(FNode):
    """(B, S, H) -> (B, H): the token at ``index`` (0: [CLS] / <s>)."""

    index: int = 0
    op: ClassVar[str] = "take_row"
    describes: ClassVar[str] = "Gather(axis=1, index) or Slice of one position [+ Squeeze]: CLS pooling"

    def attrs(self) -> str:
        return f"index={self.index}"


@_register
@dataclass(frozen=True, eq=False)
class MeanPool(FNode):
    """Mean over the sequence of the unmasked tokens: inputs (x (B,S,H), mask (B,S) 0/1)."""

    op: ClassVar[str] = "mean_pool"
    arity: ClassVar[int | None] = 2
    describes: ClassVar[str] = "ReduceSum(x * mask, seq) / max(ReduceSum(mask, seq), eps): mean pooling"


@_register
@dataclass(frozen=True, eq=False)
class L2Normalize(FNode):
    """``x / max(||x||_2, eps)`` over the last axis."""

    eps: float = 1e-12
    op: ClassVar[str] = "l2_normalize"
    describes: ClassVar[str] = "x / max(sqrt(ReduceSum(x^2)) or ReduceL2, eps): L2 normalization"


@dataclass(frozen=True, eq=False)
class IndexGraph:
    """The integer part of the model: an ONNX subgraph from the graph inputs to every index
    tensor the activations read (ids, position ids, token types, masks). It runs as the
    ONNX graph says, on integers and booleans (exact in any engine); ``float_outputs`` are
    mask tensors whose float values are one of a few constants (0 or a large negative)."""

    model: bytes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_session", None)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every index tensor, by name, for graph-input ``feeds`` (names as the model's)."""
        if not self.outputs:
            return {}
        sess = self.__dict__.get("_session")
        if sess is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            sess = ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"])
            object.__setattr__(self, "_session", sess)
        want = {i.name: i.type for i in sess.get_inputs()}
        f = {}
        for k in want:
            v = np.asarray(feeds[k])
            f[k] = v.astype(np.int32) if "int32" in want[k] else v.astype(np.int64)
        return dict(zip(self.outputs, sess.run(list(self.outputs), f), strict=True))


@dataclass(frozen=True, eq=False)
class FGraph:
    """Typed float graph: nodes in execution order, graph inputs by role, outputs by name.

    ``inputs``: ONNX graph input name -> role (``input_ids``, ``attention_mask``,
    ``token_type_ids`` or ``position_ids``); ``outputs``: ONNX output names (activations) in
    graph order; ``index``: the index subgraph; ``info``: vocab size, max positions, opset..."""

    nodes: tuple[FNode, ...]
    inputs: dict[str, str]
    outputs: tuple[str, ...]
    index: IndexGraph
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen = set(self.inputs) | set(self.index.outputs)
        for n in self.nodes:
            for i in n.inputs:
                if i not in seen:
                    raise n.error(f"reads {i!r} before it is produced")
            seen.add(n.name)
        for o in self.outputs:
            if o not in seen:
                raise UnsupportedGraphError(f"graph output {o!r} is not produced by the activation graph")

    def node(self, name: str) -> FNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producers(self) -> dict[str, FNode]:
        return {n.name: n for n in self.nodes}

    def consumers(self) -> dict[str, list[FNode]]:
        c: dict[str, list[FNode]] = {}
        for n in self.nodes:
            for i in n.inputs:
                c.setdefault(i, []).append(n)
        return c

    def role_input(self, role: str) -> str | None:
        return next((k for k, v in self.inputs.items() if v == role), None)

    def dump(self) -> str:
        lines = [f"# bbct float graph, {len(self.nodes)} nodes; inputs {self.inputs}"]
        lines.append(f"index {', '.join(self.index.outputs) or '-'}")
        lines += [n.line() for n in self.nodes]
        lines += [f"output {o}" for o in self.outputs]
        return "\n".join(lines)
