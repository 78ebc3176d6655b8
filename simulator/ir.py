"""The pure-integer IR: typed, frozen nodes in topological order, validated when built.

Every value that flows between nodes is a :class:`bbct.kernels.formats.QTensor` (integers, their
:class:`IntFormat` and their per-block exponents). Constants (weights, biases, LUTs,
integer parameters of nonlinear kernels) live on the nodes; they were made integers once,
by :mod:`bbct.simulator.lower`. ``Graph.dump()`` gives one readable line per node.

Tensor names: the graph inputs are ``input_ids``, ``attention_mask``, ``token_type_ids``
(integer id arrays); every node has one output named after the node.
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


@dataclass(frozen=True, eq=False)
class Linear(Node):
    """``acc = x_aligned @ weight + bias`` in an ``acc_bits`` accumulator.

    ``weight`` holds the aligned integer weights (K, N) at exponent ``w_exp``; ``stored`` is the
    block-scaled weight as it is stored (what compression counts and vectors dump).
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
        _req(self.weight.dtype == np.int64, self, f"weight dtype {self.weight.dtype}, int64 expected")
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
class SplitHeads(Node):
    """(B, S, H) -> (B, heads, S, d), or (B, heads, d, S) when ``transpose`` (keys)."""

    num_heads: int = 1
    transpose: bool = False
    op: ClassVar[str] = "split_heads"

    def attrs(self) -> str:
        return f"heads={self.num_heads}{' T' if self.transpose else ''}"


@dataclass(frozen=True, eq=False)
class MergeHeads(Node):
    """(B, heads, S, d) -> (B, S, heads*d); per-head exponents stay per block."""

    op: ClassVar[str] = "merge_heads"


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
    """attention_mask (B, S) of 0/1 -> additive integer mask (B, 1, 1, S): 0 or ``value``."""

    value: int = 0
    e_out: int = 0
    bits: int = 16
    op: ClassVar[str] = "mask"

    def attrs(self) -> str:
        return f"masked={self.value}@2^{self.e_out}"


@dataclass(frozen=True, eq=False)
class Nonlinear(Node):
    """A fixed-point nonlinearity (softmax, gelu, layernorm, tanh) with integer ``params``."""

    kind: str = ""
    method: str = ""
    params: Any = None
    e_in: int = 0
    e_out: int = 0
    out_fmt: IntFormat = IntFormat(bits=16)
    op: ClassVar[str] = "nonlinear"

    def validate(self) -> None:
        _req(self.kind in ("softmax", "gelu", "layernorm", "tanh"), self, f"kind={self.kind!r}")
        _req(self.params is not None, self, "params missing")

    @property
    def arity(self) -> int:  # type: ignore[override]
        return 2 if self.kind == "softmax" else 1

    def attrs(self) -> str:
        return f"{self.kind}[{self.method}] in@2^{self.e_in} -> {self.out_fmt.short()} @2^{self.e_out}"


@dataclass(frozen=True, eq=False)
class TakeCls(Node):
    """(B, S, H) -> (B, H): the first token."""

    op: ClassVar[str] = "take_cls"


@dataclass(frozen=True, eq=False)
class Graph:
    """Nodes in execution order, with the model outputs (role -> tensor) and bookkeeping."""

    nodes: tuple[Node, ...]
    outputs: dict[str, str]
    config_name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen = set(GRAPH_INPUTS)
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
