"""Port widths and integer parameters of every IR node, for RTL: JSON and a SystemVerilog package.

A port's width and signedness come from the node's number format, never from the values seen
in one run: an aligned tensor is its input's width plus the align guard, an accumulator is
``acc_bits`` wide, softmax probabilities are unsigned ``out_bits``. :data:`PORTS` holds one
rule per IR node type (a registry, like the executor's); :func:`tensor_port` walks the graph
with it. :func:`constant_port` gives the width of each constant table a node holds.

:func:`node_params` gives, per node, the scalar parameters a hardware block needs (widths,
shifts, multipliers, exponents, LUT depths), the port widths and the constants' layout;
:func:`params_json` collects them for a graph and :func:`params_sv` writes the same integers
as ``localparam``s of one SystemVerilog package that an RTL top can ``import``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bbct.golden.errors import BbctError
from bbct.kernels.formats import EXP_ZERO, IntFormat, Rounding, Saturation, ScaleKind
from bbct.simulator import ir

EXP_BITS = 16  # every exponent file and exponent port: two's complement, 16 bits
IDS_FORMAT = IntFormat(bits=32, block_size=0)  # graph inputs (token ids, masks, positions)


@dataclass(frozen=True)
class Port:
    """A port's width and signedness as its format fixes them."""

    bits: int
    signed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed}


def _fmt_port(fmt: IntFormat) -> Port:
    """Codes of a block format; a MULT scale's value ``q * mant`` is what flows on (align)."""
    return Port(fmt.bits, fmt.signed)


class _Walk:
    """What a port rule may ask: the port of a tensor already seen and the node that made it."""

    def __init__(self, graph: ir.Graph) -> None:
        self.ports: dict[str, Port] = {}
        self.producer = {n.name: n for n in graph.nodes}

    def __call__(self, tensor: str) -> Port:
        return self.ports[tensor]


PORTS: dict[type, Callable[[Any, _Walk], Port]] = {
    ir.Embed: lambda n, src: _fmt_port(n.table.fmt),
    ir.Add: lambda n, src: _fmt_port(n.fmt),
    ir.Requant: lambda n, src: _fmt_port(n.fmt),
    # q * mant shifted left by at most ``guard`` bits: the input's width + mant_bits + guard
    ir.Align: lambda n, src: Port(src(n.inputs[0]).bits + _mant_bits(n, src) + n.guard, True),
    ir.Linear: lambda n, src: Port(n.acc_bits, True),
    ir.MatMul: lambda n, src: Port(n.acc_bits, True),
    ir.Rescale: lambda n, src: _fmt_port(n.fmt),
    ir.SplitHeads: lambda n, src: src(n.inputs[0]),
    ir.MergeHeads: lambda n, src: src(n.inputs[0]),
    ir.TakeRow: lambda n, src: src(n.inputs[0]),
    ir.Relu: lambda n, src: src(n.inputs[0]),
    ir.Mask: lambda n, src: Port(n.bits, True),
    ir.Softmax: lambda n, src: _fmt_port(n.out_fmt),
    ir.Gelu: lambda n, src: _fmt_port(n.out_fmt),
    ir.Tanh: lambda n, src: _fmt_port(n.out_fmt),
    ir.LayerNorm: lambda n, src: _fmt_port(n.out_fmt),
    ir.L2Normalize: lambda n, src: _fmt_port(n.out_fmt),
    ir.MeanPool: lambda n, src: Port(n.params.out_bits, True),
    # a model's given quantization: centered codes q - zp of the given range
    ir.AffineQuantize: lambda n, src: Port(n.bits, True),
    ir.DynamicQuantize: lambda n, src: Port(9, True),  # q - zp with q, zp in 0..255
    ir.RescaleChannels: lambda n, src: _fmt_port(n.fmt),
    ir.BiasAdd: lambda n, src: _fmt_port(n.fmt),
    ir.CodeTable: lambda n, src: Port(n.bits, True),
}


def _mant_bits(n: ir.Align, src: _Walk) -> int:
    """Extra bits of a MULT-scaled input (``q * mant``, ``mant`` below ``2**mant_bits``)."""
    fmt = getattr(src.producer.get(n.inputs[0]), "fmt", None)
    return fmt.mant_bits if isinstance(fmt, IntFormat) and fmt.scale == ScaleKind.MULT else 0


def tensor_ports(graph: ir.Graph) -> dict[str, Port]:
    """Port of every tensor of ``graph``: graph inputs and index tensors are 32-bit signed,
    each node's output follows :data:`PORTS`."""
    walk = _Walk(graph)
    for name in [*graph.inputs, *graph.inputs.values(), *(graph.index.outputs if graph.index is not None else ())]:
        walk.ports[name] = _fmt_port(IDS_FORMAT)
    for n in graph.nodes:
        rule = PORTS.get(type(n))
        if rule is None:
            raise BbctError(f"node {n.name} ({n.op}): no port-width rule; known ops: {sorted(c.op for c in PORTS)}")
        walk.ports[n.name] = rule(n, walk)
    return walk.ports


def constant_port(node: ir.Node, key: str) -> Port:
    """Width of a constant table ``key`` of ``node`` (as :func:`node_arrays` names them)."""
    if key.endswith(".exp") or key == "exp":
        return Port(EXP_BITS, True)
    if key.endswith(".mant"):
        return Port(node.stored.fmt.mant_bits if isinstance(node, ir.Linear) else node.table.fmt.mant_bits, False)
    if isinstance(node, ir.Embed) and key == "table":
        return _fmt_port(node.table.fmt)
    if isinstance(node, ir.Linear) and node.stored is None:  # a model's given codes (QDQ import)
        if key == "bias":
            return Port(node.bias_bits, True)
        # the given weight codes minus their zero point: 9 bits for uint8/int8 with a zero point
        peak = int(np.abs(np.asarray(node.weight)).max(initial=0))
        return Port(max(peak.bit_length() + 1, 2), True)
    if isinstance(node, ir.Linear):
        s = node.stored.fmt
        mant = s.mant_bits if s.scale == ScaleKind.MULT else 0
        return {
            "stored": Port(s.bits, s.signed),
            "weight": Port(s.bits + mant + weight_guard(node), True),
            "bias": Port(node.bias_bits, True),
        }[key]
    if isinstance(node, ir.CodeTable) and key == "table":  # centered output codes
        return Port(node.bits, True)
    if isinstance(node, ir.BiasAdd) and key == "bias":  # at the sum's exponent, within its width
        return _fmt_port(node.fmt)
    if isinstance(node, ir.RescaleChannels) and key in ("multiplier", "shift"):
        return Port(31, False) if key == "multiplier" else Port(EXP_BITS, True)  # M < 2**31; shifts as exponents
    p = getattr(node, "params", None)
    if key == "params.table":  # GELU / tanh LUT entries at the output format
        return Port(p.out_bits, p.signed)
    if key == "params.clipped":  # one flag per LUT entry: clipped to out_bits at lowering
        return Port(1, False)
    if key == "params.exp_table":  # softmax exp LUT: Q.22 values up to 2**22
        return Port(p.exp_frac + 1, False)
    if key == "params.gamma":
        return Port(p.gamma_bits, True)
    if key == "params.beta":
        return Port(p.out_bits, True)
    raise BbctError(f"node {node.name} ({node.op}): no width rule for constant {key!r}")


def weight_guard(node: ir.Linear) -> int:
    """The guard bits the aligned ``weight`` keeps: ``max(stored exponents) - w_exp`` (0 for an
    all-zero weight), i.e. the config's ``weight_guard``."""
    if node.stored is None:  # given codes: the weight is multiplied as stored
        return 0
    e = np.asarray(node.stored.exp)
    real = e[e != EXP_ZERO]
    return int(real.max()) - int(node.w_exp) if real.size else 0


def node_arrays(node: ir.Node) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON-able scalar parameters of a node, and its array constants (dumped as files).

    Arrays: a stored block tensor ``k`` gives ``k`` (codes), ``k.exp`` and, for MULT scales,
    ``k.mant``; a params record's tables ``params.<name>``; an ndarray attribute of more than
    8 values (a static exponent per channel, a bias) itself. Shorter ones stay scalars."""
    scalars: dict[str, Any] = {"op": node.op}
    arrays: dict[str, np.ndarray] = {}
    for k, v in vars(node).items():
        if k in ("name", "inputs", "onnx_name") or v is None:
            continue
        if hasattr(v, "data") and hasattr(v, "fmt"):  # a stored QTensor (weights, tables)
            arrays[k] = v.data
            arrays[k + ".exp"] = np.asarray(v.exp)
            if getattr(v, "mant", None) is not None:
                arrays[k + ".mant"] = np.asarray(v.mant)
            scalars[k + ".format"] = v.fmt.to_dict()
            scalars[k + ".shape"] = list(v.data.shape)
            e = np.asarray(v.exp)
            real = e[e != EXP_ZERO]  # the exponents a ROM must hold (all-zero blocks aside)
            scalars[k + ".exp_range"] = [int(real.min()), int(real.max())] if real.size else []
        elif hasattr(v, "to_dict"):  # IntFormat, kernel parameter records (LUTs inside)
            d = v.to_dict()
            for pk, pv in list(d.items()):
                if isinstance(pv, (list, tuple, np.ndarray)) and np.asarray(pv).size > 8:
                    arrays[f"{k}.{pk}"] = np.asarray(pv)
                    d[pk] = f"<file {node.name}.{k}.{pk}>"
            scalars[k] = d
        elif isinstance(v, np.ndarray):
            if v.size > 8:
                arrays[k] = v
            else:
                scalars[k] = v.tolist()
        elif hasattr(v, "name") and hasattr(v, "value"):  # rounding / saturation enums
            scalars[k] = v.name
        elif isinstance(v, (int, float, str, bool, tuple)):
            scalars[k] = v
    if isinstance(node, ir.Linear):
        scalars["weight_guard"] = weight_guard(node)
        scalars["weight.shape"] = list(node.weight.shape)
    return scalars, arrays


LAYOUTS = {
    "weight": "(K, N): row k = input channel, column n = output channel; acc[m, n] = sum_k x[m, k] * weight[k, n]",
    "stored": "(K, N) like weight; blocks of block_size along K (axis 0); stored.exp is (K / block_size, N)",
    "table": "(V, H): row v = the embedding of id v; blocks along H",
}


def node_params(node: ir.Node, ports: dict[str, Port]) -> dict[str, Any]:
    """One node's record: op, inputs, port widths, scalar parameters, LUT depths, constants."""
    scalars, arrays = node_arrays(node)
    rec: dict[str, Any] = {
        "name": node.name,
        "op": node.op,
        "inputs": list(node.inputs),
        "ports": {
            **{f"in{i}": {"tensor": t, **ports[t].to_dict()} for i, t in enumerate(node.inputs)},
            "out": {"tensor": node.name, **ports[node.name].to_dict()},
        },
        "exp_bits": EXP_BITS,
        "params": scalars,
        "constants": {},
    }
    for k, a in arrays.items():
        c = {"shape": list(np.shape(a)), **constant_port(node, k).to_dict()}
        if k.split(".")[0] in LAYOUTS and "." not in k:
            c["layout"] = LAYOUTS[k]
        if k.startswith("params.") and k.endswith("table"):
            c["lut_depth"] = int(np.size(a))
        rec["constants"][k] = c
    return rec


def params_json(graph: ir.Graph) -> dict[str, Any]:
    """Every node's :func:`node_params`, keyed by node name, in execution order."""
    ports = tensor_ports(graph)
    return {n.name: node_params(n, ports) for n in graph.nodes}


def sv_name(*parts: str) -> str:
    """A SystemVerilog identifier from name parts: ``L0.q.acc`` + ``acc_bits`` ->
    ``L0_Q_ACC_ACC_BITS`` (anything but letters and digits becomes ``_``)."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", "_".join(parts)).strip("_").upper()
    return s if s and not s[0].isdigit() else "N_" + s


def _sv_ints(prefix: str, value: Any, out: list[tuple[str, int, str]]) -> None:
    """Flatten integers (bools as 0/1, mode names as their codes) under ``prefix``."""
    if isinstance(value, bool):
        out.append((prefix, int(value), ""))
    elif isinstance(value, (int, np.integer)):
        out.append((prefix, int(value), ""))
    elif isinstance(value, dict):
        for k, v in value.items():
            _sv_ints(f"{prefix}_{k}", v, out)
    elif isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, (int, np.integer)) for v in value):
        for i, v in enumerate(value):
            out.append((f"{prefix}_{i}", int(v), ""))
    elif isinstance(value, str):
        for enum in (Rounding, Saturation, ScaleKind):
            if value in enum.__members__:
                out.append((prefix, int(enum[value].value), value))
                return


def sv_literal(v: int) -> tuple[str, str]:
    """(type, literal): ``int`` when the value fits 32 bits signed, else a 64-bit ``longint``."""
    if -(1 << 31) <= v < (1 << 31):
        return "int", str(v)
    return "longint", f"-64'sd{-v}" if v < 0 else f"64'sd{v}"


def params_sv(graph: ir.Graph, package: str = "bbct_params") -> str:
    """A SystemVerilog package of ``localparam``s: per node, its port widths and signedness,
    every integer parameter (widths, shifts, multipliers, exponents, rounding and saturation
    mode codes), constant shapes and LUT depths. Names: :func:`sv_name` of node and field."""
    recs = params_json(graph)
    codes = "; ".join(
        f"{e.__name__.lower()} " + " ".join(f"{m.name}={m.value}" for m in e) for e in (Rounding, Saturation, ScaleKind)
    )
    lines = [
        f"// bbct integer parameters, config {graph.config_name}: one localparam per integer, per IR node.",
        f"// Mode codes (kernels/formats.py): {codes}. Exponents are two's complement.",
        f"package {package};",
        f"  localparam int EXP_BITS = {EXP_BITS};",
    ]
    seen: dict[str, str] = {}
    for name, r in recs.items():
        ints: list[tuple[str, int, str]] = []
        for port, p in r["ports"].items():
            ints += [(f"{port}_bits", p["bits"], p["tensor"]), (f"{port}_signed", int(p["signed"]), "")]
        _sv_ints("", {k: v for k, v in r["params"].items() if k != "op"}, ints)
        for k, c in r["constants"].items():
            for i, d in enumerate(c["shape"]):
                ints.append((f"const_{k}_dim{i}", d, ""))
            ints += [(f"const_{k}_bits", c["bits"], ""), (f"const_{k}_signed", int(c["signed"]), "")]
            if "lut_depth" in c:
                ints.append((f"const_{k}_lut_depth", c["lut_depth"], ""))
        lines.append(f"  // {name} ({r['op']})")
        for field, v, note in ints:
            ident = sv_name(name, field)
            if ident in seen and seen[ident] != f"{name}.{field}":
                raise BbctError(f"SystemVerilog name {ident} stands for both {seen[ident]} and {name}.{field}")
            seen[ident] = f"{name}.{field}"
            typ, lit = sv_literal(v)
            lines.append(f"  localparam {typ} {ident} = {lit};" + (f"  // {note}" if note else ""))
    lines.append(f"endpackage : {package}")
    return "\n".join(lines) + "\n"
