"""The pure-integer IR: typed, frozen nodes in topological order, validated when built.

Every value that flows between nodes is a :class:`bbct.kernels.formats.QTensor` (integers, their
:class:`IntFormat` and their per-block exponents). Constants (weights, biases, LUTs,
integer parameters of nonlinear kernels) live on the nodes; they were made integers once,
by :mod:`bbct.simulator.lower`. ``Graph.dump()`` gives one readable line per node.

Tensor names: the graph inputs (integer id arrays: ``input_ids``, ``attention_mask``,
``token_type_ids`` by role, and under their ONNX names) and the index tensors the model's
index subgraph computes (positions, masks); every node has one output named after the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bbct.kernels.formats import IntFormat, QTensor, Rounding, Saturation
from bbct.simulator.errors import LoweringError

GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True, eq=False)
class Node:
    """Base: ``name`` (unique, also the output tensor name), ``inputs``, golden ``onnx_name``."""

    name: str
    inputs: tuple[str, ...]
    onnx_name: str | None = None
    op: ClassVar[str] = "node"
    arity: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise LoweringError(f"{self.op} node without a name")
        if len(self.inputs) != self.arity:
            raise LoweringError(f"node {self.name} ({self.op}) takes {self.arity} input(s), got {self.inputs}")
        self.validate()

    def validate(self) -> None:
        """Subclasses check their attributes here and raise LoweringError naming the field."""

    def attrs(self) -> str:
        return ""

    def line(self) -> str:
        golden = f"  ~ {self.onnx_name}" if self.onnx_name else ""
        return f"{self.name} = {self.op}({', '.join(self.inputs)}) {self.attrs()}{golden}".rstrip()


def _req(cond: bool, node: Node, msg: str) -> None:
    if not cond:
        raise LoweringError(f"node {node.name} ({node.op}): {msg}")


@dataclass(frozen=True, eq=False)
class Embed(Node):
    """Gather rows of an integer table (``table``: block-scaled along hidden)."""

    table: QTensor | None = None
    op: ClassVar[str] = "embed"

    def validate(self) -> None:
        _req(self.table is not None and self.table.data.ndim == 2, self, "table must be a 2-D QTensor")

    def attrs(self) -> str:
        t = self.table
        return f"table={t.shape} {t.fmt.short()}"


@dataclass(frozen=True, eq=False)
class Add(Node):
    """Exact sum of two block-scaled tensors, then requantized to ``fmt`` (static ``exp`` or dynamic)."""

    fmt: IntFormat = IntFormat()
    exp: np.ndarray | None = None
    op: ClassVar[str] = "add"
    arity: ClassVar[int] = 2

    def attrs(self) -> str:
        return f"-> {self.fmt.short()} {'static' if self.exp is not None else 'dynamic'}"


@dataclass(frozen=True, eq=False)
class Align(Node):
    """Expand block exponents to one exponent per group (``reduce_axes``) with ``guard`` bits."""

    reduce_axes: tuple[int, ...] = (-1,)
    guard: int = 0
    rounding: Rounding = Rounding.RND_CONV
    op: ClassVar[str] = "align"

    def validate(self) -> None:
        _req(0 <= self.guard <= 30, self, f"guard={self.guard} must be in 0..30")

    def attrs(self) -> str:
        return f"axes={self.reduce_axes} guard={self.guard} {self.rounding.name}"


def narrow_ints(a: np.ndarray) -> np.ndarray:
    """Integers ``a`` as a contiguous array of the narrowest signed type (int8, int16, int32,
    int64) that holds every value and its negation (the type's minimum is never used): a
    constant's memory, not its values, depends on the type."""
    a = np.asarray(a)
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        for t in (np.int8, np.int16, np.int32):
            info = np.iinfo(t)
            if lo > info.min and hi <= info.max:
                return np.ascontiguousarray(a.astype(t))
    return np.ascontiguousarray(a.astype(np.int64))


@dataclass(frozen=True, eq=False)
class Linear(Node):
    """``acc = x_aligned @ weight + bias`` in an ``acc_bits`` accumulator.

    ``weight`` holds the aligned integer weights (K, N) at exponent ``w_exp``, in the narrowest
    signed type that holds them (:func:`narrow_ints`; the GEMM widens them to int64 per
    product); ``stored`` is the block-scaled weight as it is stored (what compression counts
    and vectors dump).
    """

    weight: np.ndarray | None = None
    w_exp: int = 0
    stored: QTensor | None = None
    bias: np.ndarray | None = None
    bias_exp: int = 0
    bias_bits: int = 32
    acc_bits: int = 32
    acc_saturation: Saturation = Saturation.SAT
    bias_rounding: Rounding = Rounding.RND_CONV
    op: ClassVar[str] = "linear"

    def validate(self) -> None:
        _req(self.weight is not None and self.weight.ndim == 2, self, "weight must be 2-D")
        _req(self.weight.dtype.kind == "i", self, f"weight dtype {self.weight.dtype}, signed integers expected")
        if self.bias is not None:
            _req(self.bias.shape == (self.weight.shape[1],), self, f"bias shape {self.bias.shape}")
        _req(8 <= self.acc_bits <= 62, self, f"acc_bits={self.acc_bits} must be in 8..62")

    def attrs(self) -> str:
        k, n = self.weight.shape
        st = f" stored={self.stored.fmt.short()}" if self.stored is not None else ""
        b = f" bias=s{self.bias_bits}@2^{self.bias_exp}" if self.bias is not None else ""
        return f"W=({k},{n})@2^{self.w_exp}{st}{b} acc=s{self.acc_bits}/{self.acc_saturation.name}"


@dataclass(frozen=True, eq=False)
class Requant(Node):
    """Narrow to ``fmt``: static block exponents ``exp`` (calibrated) or dynamic (LZC) if None."""

    fmt: IntFormat = IntFormat()
    exp: np.ndarray | None = None
    op: ClassVar[str] = "requant"

    def attrs(self) -> str:
        if self.exp is None:
            mode = "dynamic"
        else:
            e = np.asarray(self.exp)
            mode = f"static exp[{e.min()}..{e.max()}]" if e.size > 1 else f"static exp={int(e.ravel()[0])}"
        return f"-> {self.fmt.short()} {mode}"


@dataclass(frozen=True, eq=False)
class Rescale(Node):
    """Multiply by a constant ``multiplier * 2**-shift`` and land on the fixed exponent ``e_out``."""

    multiplier: int = 1
    shift: int = 0
    e_out: int = 0
    fmt: IntFormat = IntFormat(bits=16)
    op: ClassVar[str] = "rescale"

    def validate(self) -> None:
        _req(0 < self.multiplier < (1 << 31), self, f"multiplier={self.multiplier} must be in 1..2**31-1")

    def attrs(self) -> str:
        return f"x*{self.multiplier}*2^-{self.shift} -> {self.fmt.short()} @2^{self.e_out}"


@dataclass(frozen=True, eq=False)
class AffineQuantize(Node):
    """Block-scaled codes -> centered codes ``q - zero_point`` of a given affine format:
    ``q = clip(((x * multiplier) >>r (shift - e)) + zero_point, qmin, qmax)``
    (:func:`bbct.kernels.affine.affine_quantize`); the output's exponent is 0, its unit the
    given scale. ``given`` names the scale and zero point the model states (for the dump)."""

    multiplier: int = 1
    shift: int = 0
    zero_point: int = 0
    qmin: int = -128
    qmax: int = 127
    rounding: Rounding = Rounding.RND_CONV
    given: str = ""
    op: ClassVar[str] = "affine_quantize"

    def validate(self) -> None:
        _req(0 < self.multiplier < (1 << 31), self, f"multiplier={self.multiplier} must be in 1..2**31-1")
        _req(self.qmin <= self.zero_point <= self.qmax, self, f"zero_point={self.zero_point} outside qmin..qmax")

    @property
    def bits(self) -> int:
        """Signed width of the centered codes."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point)).bit_length() + 1

    def attrs(self) -> str:
        return (
            f"x*{self.multiplier}*2^-{self.shift} +zp {self.zero_point} -> [{self.qmin},{self.qmax}] "
            f"{self.rounding.name} (given {self.given})"
        )


@dataclass(frozen=True, eq=False)
class DynamicQuantize(Node):
    """Run-time uint8 quantization of a whole tensor with a power-of-two scale (the integer
    stand-in for ``DynamicQuantizeLinear``'s float scale): centered codes ``q - zp`` at the
    exponent ``k`` found from the integer range (:func:`bbct.kernels.affine.dynamic_quantize`)."""

    rounding: Rounding = Rounding.RND_CONV
    given: str = ""
    op: ClassVar[str] = "dynamic_quantize"

    def attrs(self) -> str:
        return f"u8 pow2 scale from the integer range {self.rounding.name} (model: {self.given})"


@dataclass(frozen=True, eq=False)
class RescaleChannels(Node):
    """Per output channel ``n`` (``multiplier[n] * 2**-shift[n] ~= unit[n]``, the accumulator's unit):
    ``y = sat((acc * multiplier[n]) >>r (shift[n] + e_out - e_acc))``
    to ``fmt`` at the fixed exponent ``e_out``: an accumulator in units of the given scales
    ``s_x * s_w[n]`` brought to a power-of-two exponent (the multipliers made at lowering)."""

    multiplier: np.ndarray | None = None
    shift: np.ndarray | None = None
    e_out: int = 0
    relative: bool = False  # e_out is relative to the input's (run-time) exponent of each row
    fmt: IntFormat = IntFormat(bits=32)
    op: ClassVar[str] = "rescale_channels"

    def validate(self) -> None:
        m, s = self.multiplier, self.shift
        _req(m is not None and s is not None and m.ndim == 1 and m.shape == s.shape, self, "1-D multiplier and shift")
        _req(m.dtype.kind == "i" and s.dtype.kind == "i", self, "integer multiplier and shift")
        _req(bool(np.all((m > 0) & (m < (1 << 31)))), self, "multipliers must be in 1..2**31-1")

    def attrs(self) -> str:
        at = f"2^(e_in{self.e_out:+d})" if self.relative else f"2^{self.e_out}"
        return f"x*m[{self.multiplier.size}]*2^-s -> {self.fmt.short()} @{at}"


@dataclass(frozen=True, eq=False)
class BiasAdd(Node):
    """``sat(x + bias[n])`` to ``fmt``, the bias stored at the input's fixed exponent
    (:func:`bbct.kernels.biasadd.bias_add`): a bias added after the given codes of a product."""

    bias: np.ndarray | None = None
    fmt: IntFormat = IntFormat(bits=32)
    op: ClassVar[str] = "bias_add"

    def validate(self) -> None:
        b = self.bias
        _req(b is not None and b.ndim == 1 and b.dtype.kind == "i", self, "a 1-D integer bias")
        bits = self.fmt.bits  # 2..62, checked by IntFormat
        lim = 1 << (bits - 1)
        _req(not b.size or (int(b.min()) >= -lim and int(b.max()) < lim), self, f"a bias that fits s{bits}")

    def attrs(self) -> str:
        return f"+b[{self.bias.size}] -> {self.fmt.short()}"


@dataclass(frozen=True, eq=False)
class CodeTable(Node):
    """Centered given codes in, centered given codes out: ``table[c - c_lo]``
    (:func:`bbct.kernels.codetable.code_table`), a unary region over every input code."""

    table: np.ndarray | None = None
    c_lo: int = 0
    bits: int = 9  # signed width of the output codes
    given: str = ""
    op: ClassVar[str] = "code_table"

    def validate(self) -> None:
        t = self.table
        _req(t is not None and t.ndim == 1 and t.size > 0 and t.dtype.kind == "i", self, "a 1-D integer table")
        _req(2 <= self.bits <= 62, self, f"bits={self.bits} must be in 2..62")
        lim = 1 << (self.bits - 1)
        _req(int(t.min()) >= -lim and int(t.max()) < lim, self, f"table entries that fit s{self.bits}")

    def attrs(self) -> str:
        return f"table[{self.table.size}] from {self.c_lo} -> s{self.bits} ({self.given})"


@dataclass(frozen=True, eq=False)
class SplitHeads(Node):
    """(B, S, H) -> (B, heads, S, d), or (B, heads, d, S) when ``transpose`` (keys)."""

    num_heads: int = 1
    transpose: bool = False
    codes: bool = False  # given codes (exponent 0 in every row): one exponent for all
    op: ClassVar[str] = "split_heads"

    def attrs(self) -> str:
        return f"heads={self.num_heads}{' T' if self.transpose else ''}{' codes' if self.codes else ''}"


@dataclass(frozen=True, eq=False)
class MergeHeads(Node):
    """(B, heads, S, d) -> (B, S, heads*d); per-head exponents stay per block."""

    codes: bool = False  # given codes (exponent 0 in every row): exponent 0 per merged row
    op: ClassVar[str] = "merge_heads"

    def attrs(self) -> str:
        return "codes" if self.codes else ""


@dataclass(frozen=True, eq=False)
class MatMul(Node):
    """Product of two aligned activations (Q K^T, P V) in an ``acc_bits`` accumulator."""

    acc_bits: int = 32
    acc_saturation: Saturation = Saturation.SAT
    op: ClassVar[str] = "matmul"
    arity: ClassVar[int] = 2

    def attrs(self) -> str:
        return f"acc=s{self.acc_bits}/{self.acc_saturation.name}"


@dataclass(frozen=True, eq=False)
class Mask(Node):
    """An index mask tensor -> additive integer mask codes at exponent ``e_out``: 0 to keep,
    ``value`` (the softmax input type's minimum) to mask. ``kind`` says which elements mask:
    ``add``: the float mask's value ``float_value`` (any other value but 0 is an error at run
    time), ``where_true`` / ``where_false``: the True / False elements of a boolean."""

    kind: str = "add"
    float_value: float = 0.0
    value: int = 0
    e_out: int = 0
    bits: int = 16
    op: ClassVar[str] = "mask"

    def validate(self) -> None:
        _req(self.kind in ("add", "where_true", "where_false"), self, f"kind={self.kind!r}")

    def attrs(self) -> str:
        return f"{self.kind} masked={self.value}@2^{self.e_out}"


@dataclass(frozen=True, eq=False)
class _Fixed(Node):
    """Base of the nonlinear kernels: integer ``params`` made at lowering, input at exponent
    ``e_in`` (where the kernel needs one), output codes of ``out_fmt`` at exponent ``e_out``."""

    method: str = ""
    params: Any = None
    e_in: int = 0
    e_out: int = 0
    out_fmt: IntFormat = IntFormat(bits=16)

    def validate(self) -> None:
        _req(self.params is not None, self, "params missing")

    def attrs(self) -> str:
        m = f"[{self.method}]" if self.method else ""
        return f"{m} in@2^{self.e_in} -> {self.out_fmt.short()} @2^{self.e_out}"


@dataclass(frozen=True, eq=False)
class Softmax(_Fixed):
    """Softmax over the last axis of fixed-point scores, plus an optional additive mask."""

    op: ClassVar[str] = "softmax"

    @property
    def arity(self) -> int:  # type: ignore[override]
        return len(self.inputs) if len(self.inputs) in (1, 2) else 2


@dataclass(frozen=True, eq=False)
class Gelu(_Fixed):
    """GELU of fixed-point codes by polynomial (``poly``) or table (``lut``)."""

    op: ClassVar[str] = "gelu"


@dataclass(frozen=True, eq=False)
class Tanh(_Fixed):
    """tanh of fixed-point codes by table."""

    op: ClassVar[str] = "tanh"


@dataclass(frozen=True, eq=False)
class LayerNorm(_Fixed):
    """LayerNorm of rows aligned to one exponent per row (integer mean, variance, isqrt)."""

    op: ClassVar[str] = "layernorm"


@dataclass(frozen=True, eq=False)
class Relu(Node):
    """max(x, 0) on the codes; the block exponents pass through."""

    params: Any = None
    op: ClassVar[str] = "relu"


@dataclass(frozen=True, eq=False)
class MeanPool(Node):
    """Mean over the unmasked tokens of (B, S, H) aligned along the sequence: (x, mask)."""

    params: Any = None
    op: ClassVar[str] = "mean_pool"
    arity: ClassVar[int] = 2


@dataclass(frozen=True, eq=False)
class L2Normalize(_Fixed):
    """x / ||x|| of rows aligned to one exponent per row; output at the fixed ``e_out``."""

    op: ClassVar[str] = "l2_normalize"


@dataclass(frozen=True, eq=False)
class TakeRow(Node):
    """(B, S, H) -> (B, H): the token at ``index`` (0: [CLS] / <s>)."""

    index: int = 0
    op: ClassVar[str] = "take_row"

    def attrs(self) -> str:
        return f"index={self.index}"


@dataclass(frozen=True, eq=False)
class Graph:
    """Nodes in execution order, with the model outputs (role -> tensor) and bookkeeping."""

    nodes: tuple[Node, ...]
    outputs: dict[str, str]
    config_name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=lambda: {r: r for r in GRAPH_INPUTS})
    index: Any = None  # the model's IndexGraph: positions, masks (frontend.fgraph.IndexGraph)

    def __post_init__(self) -> None:
        seen = set(self.inputs) | set(self.inputs.values())
        if self.index is not None:
            seen |= set(self.index.outputs)
        for n in self.nodes:
            for i in n.inputs:
                if i not in seen:
                    raise LoweringError(f"node {n.name} ({n.op}) reads {i!r} before it is produced")
            if n.name in seen:
                raise LoweringError(f"tensor {n.name!r} produced twice")
            seen.add(n.name)
        for role, t in self.outputs.items():
            if t not in seen:
                raise LoweringError(f"output {role} names unknown tensor {t!r}")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def dump(self) -> str:
        """One line per node: op, inputs, output format, block layout, scales, golden name."""
        lines = [f"# bbct integer IR, config {self.config_name}, {len(self.nodes)} nodes"]
        lines += [n.line() for n in self.nodes]
        lines += [f"output {role} = {t}" for role, t in self.outputs.items()]
        return "\n".join(lines)
