"""Quantization configuration: one validated TOML file, presets, per-op-class and per-layer overrides.

A config is a table of *settings* (see :class:`OpSettings`) resolved for every quantization
point of the model. Resolution order, later wins::

    [default]  ->  [op.<class>]  ->  [optype.<op>]  ->  [layer.<i>.<class>]  ->  [node."<glob>"]

``[optype.<op>]`` selects every node of a float-graph op type (``linear``, ``softmax``,
``gelu``, ``layernorm``, ``embedding_sum``, ... as ``bbct ir --after import`` prints them);
``[node."<glob>"]`` the nodes whose name matches a shell glob, by bbct's short name
(``L5.ffn1``, ``L*.q``, ``classifier``; ``bbct ir --after roles`` lists them) or by ONNX
tensor name. A selector that matches no node of the model is an error, as is a
``[layer.<i>.*]`` beyond its layers.

Op classes (where the settings apply): ``embedding``, ``query``, ``key``, ``value``,
``attention_output``, ``intermediate``, ``output`` (the second FFN matmul), ``pooler``,
``classifier`` — the matmul/gather sites; and ``scores``, ``softmax``, ``context``,
``residual``, ``layernorm``, ``gelu``, ``tanh`` — the activation sites.

Example (``w4a8`` written out)::

    preset = "w8a8"          # optional: start from a preset
    [default]
    weight_bits = 4
    weight_block = 128
    [op.embedding]
    weight_bits = 8
    [layer.0.intermediate]
    acc_bits = 40

Unknown keys and bad values are errors that name the table, key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bbct.kernels.formats import Rounding, Saturation, ScaleKind
from bbct.kernels.softmax import MAX_LUT_ADDR_BITS as SOFTMAX_MAX_LUT_ADDR_BITS
from bbct.simulator.errors import ConfigError

MATMUL_CLASSES = (
    "embedding",
    "query",
    "key",
    "value",
    "attention_output",
    "intermediate",
    "output",
    "pooler",
    "classifier",
)
ACTIVATION_CLASSES = ("scores", "softmax", "context", "residual", "layernorm", "gelu", "tanh")
OP_CLASSES = MATMUL_CLASSES + ACTIVATION_CLASSES

GELU_METHODS = ("poly", "lut")
SOFTMAX_METHODS = ("poly", "lut")
TANH_METHODS = ("lut",)
SCALINGS = ("static", "dynamic")
WEIGHT_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class OpSettings:
    """Every knob of one quantization point. Field comments give units and ranges."""

    weight_bits: int = 8  # 2..16, signed weight codes
    weight_block: int = 32  # elements per block along the reduction axis; 0 = whole axis
    weight_scale: str = "pow2"  # "pow2" (shared exponent) or "mult" (multiplier + exponent)
    weight_mant_bits: int = 8  # multiplier width for "mult" scales
    weight_exp_bits: int = 8  # bits to store one block exponent (counted in compression)
    weight_guard: int = 12  # extra low bits kept when weight blocks are aligned for the MAC
    weight_clip_search: int = 0  # also try exponents 1..N below the max-based one; keep least MSE
    weight_method: str = "rtn"  # "rtn" (round each weight to nearest) or "gptq" (error feedback; needs calibration)
    weight_order: str = "natural"  # GPTQ visiting order: "natural" or "act" (most active inputs first)
    act_bits: int = 8  # 2..16, activation codes between ops
    act_block: int = 32  # elements per block along the hidden axis; 0 = whole axis
    act_guard: int = 4  # extra low bits kept when activation blocks are aligned
    scaling: str = "dynamic"  # "static" (calibrated exponents) or "dynamic" (run-time, LZC)
    rounding: str = "RND_CONV"  # rounding of every narrowing at this point
    saturation: str = "SAT"  # SAT, SAT_SYM or WRAP
    acc_bits: int = 42  # accumulator width of every matmul, 8..62 (the RT classifier's worst case needs 41)
    acc_saturation: str = "SAT"
    bias_bits: int = 32  # bias codes (stored at the accumulator's scale)
    residual_bits: int = 16  # width of a residual sum before LayerNorm
    gelu_method: str = "poly"
    gelu_in_bits: int = 16
    gelu_out_bits: int = 16
    gelu_lut_addr_bits: int = 8
    softmax_method: str = "poly"
    softmax_in_bits: int = 18  # scores at 2**-9 resolution over [-256, 256)
    softmax_out_bits: int = 8
    softmax_lut_addr_bits: int = 8
    layernorm_out_bits: int = 16
    tanh_method: str = "lut"
    tanh_in_bits: int = 16
    tanh_out_bits: int = 16
    tanh_lut_addr_bits: int = 10
    output_bits: int = 16  # logits / last hidden state at the model boundary
    given_mult_bits: int = 24  # multiplier width of a model's given float scale (QDQ import), 8..31

    def __post_init__(self) -> None:
        _check_range("weight_bits", self.weight_bits, 2, 16)
        _check_range("act_bits", self.act_bits, 2, 16)
        _check_range("weight_block", self.weight_block, 0, 1 << 16)
        _check_range("act_block", self.act_block, 0, 1 << 16)
        _check_range("weight_mant_bits", self.weight_mant_bits, 1, 16)
        _check_range("weight_exp_bits", self.weight_exp_bits, 1, 16)
        _check_range("weight_guard", self.weight_guard, 0, 24)
        _check_range("weight_clip_search", self.weight_clip_search, 0, 4)
        _check_range("act_guard", self.act_guard, 0, 16)
        _check_range("acc_bits", self.acc_bits, 8, 62)
        _check_range("bias_bits", self.bias_bits, 8, 62)
        _check_range("residual_bits", self.residual_bits, 4, 32)
        for k in ("gelu_in_bits", "gelu_out_bits", "softmax_in_bits", "tanh_in_bits", "tanh_out_bits"):
            _check_range(k, getattr(self, k), 4, 24)
        _check_range("softmax_out_bits", self.softmax_out_bits, 2, 16)
        _check_range("layernorm_out_bits", self.layernorm_out_bits, 4, 24)
        _check_range("output_bits", self.output_bits, 4, 32)
        _check_range("given_mult_bits", self.given_mult_bits, 8, 31)
        for k in ("gelu_lut_addr_bits", "tanh_lut_addr_bits"):
            _check_range(k, getattr(self, k), 2, 16)
        _check_range("softmax_lut_addr_bits", self.softmax_lut_addr_bits, 2, SOFTMAX_MAX_LUT_ADDR_BITS)
        # a table cannot have more address bits than its input has bits
        for fn, addr, width in (
            ("gelu", "gelu_lut_addr_bits", "gelu_in_bits"),
            ("tanh", "tanh_lut_addr_bits", "tanh_in_bits"),
        ):
            if (fn == "tanh" or self.gelu_method == "lut") and getattr(self, addr) > getattr(self, width):
                raise ConfigError(
                    f"{addr}={getattr(self, addr)} exceeds {width}={getattr(self, width)}: "
                    "the table cannot have more address bits than its input"
                )
        _check_choice("weight_scale", self.weight_scale, ("pow2", "mult"))
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        _check_choice("weight_order", self.weight_order, ("natural", "act"))
        if self.weight_method == "gptq" and self.weight_scale != "pow2":
            raise ConfigError("weight_method='gptq' needs weight_scale='pow2'")
        _check_choice("scaling", self.scaling, SCALINGS)
        _check_choice("rounding", self.rounding, tuple(m.name for m in Rounding))
        _check_choice("saturation", self.saturation, tuple(m.name for m in Saturation))
        _check_choice("acc_saturation", self.acc_saturation, tuple(m.name for m in Saturation))
        _check_choice("gelu_method", self.gelu_method, GELU_METHODS)
        _check_choice("softmax_method", self.softmax_method, SOFTMAX_METHODS)
        _check_choice("tanh_method", self.tanh_method, TANH_METHODS)

    # Typed views for the lowering.
    @property
    def rounding_mode(self) -> Rounding:
        return Rounding[self.rounding]

    @property
    def saturation_mode(self) -> Saturation:
        return Saturation[self.saturation]

    @property
    def acc_saturation_mode(self) -> Saturation:
        return Saturation[self.acc_saturation]

    @property
    def weight_scale_kind(self) -> ScaleKind:
        return ScaleKind.POW2 if self.weight_scale == "pow2" else ScaleKind.MULT


_FIELD_TYPES = {f.name: f.type for f in fields(OpSettings)}


def _check_range(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{name}={v!r}: expected an integer in {lo}..{hi}")


def _check_choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ConfigError(f"{name}={v!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Config:
    """A resolved-on-demand configuration: defaults plus overrides by op class and layer."""

    name: str = "custom"
    default: OpSettings = field(default_factory=OpSettings)
    by_class: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    by_layer: tuple[tuple[int, str, tuple[tuple[str, Any], ...]], ...] = ()
    by_type: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    by_node: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def settings(
        self, op_class: str, layer: int | None = None, op: str | None = None, names: tuple[str, ...] = ()
    ) -> OpSettings:
        """Settings for ``op_class`` (one of :data:`OP_CLASSES`) in encoder layer ``layer``, for a
        float node of type ``op`` known by ``names`` (short name, ONNX tensor name)."""
        if op_class not in OP_CLASSES:
            raise ConfigError(f"unknown op class {op_class!r}; known: {', '.join(OP_CLASSES)}")
        s = self.default
        for cls, kv in self.by_class:
            if cls == op_class:
                s = _apply(s, dict(kv), f"op.{cls}")
        for t, kv in self.by_type:
            if t == op:
                s = _apply(s, dict(kv), f"optype.{t}")
        if layer is not None:
            for li, cls, kv in self.by_layer:
                if li == layer and cls == op_class:
                    s = _apply(s, dict(kv), f"layer.{li}.{cls}")
        for g, kv in self.by_node:
            if any(fnmatch.fnmatchcase(nm, g) for nm in names):
                s = _apply(s, dict(kv), f'node."{g}"')
        return s

    def check_selectors(self, nodes: list[tuple[str, tuple[str, ...]]]) -> None:
        """Every ``[optype.*]`` and ``[node."glob"]`` must select a node of the model;
        ``nodes`` holds each float node's (op type, names)."""
        ops = sorted({op for op, _ in nodes})
        for t, _ in self.by_type:
            if t not in ops:
                raise ConfigError(f"[optype.{t}]: no node of that type in the model; its types: {', '.join(ops)}")
        for g, _ in self.by_node:
            if not any(fnmatch.fnmatchcase(nm, g) for _, names in nodes for nm in names):
                eg = ", ".join(names[0] for _, names in nodes[:6])
                raise ConfigError(f'[node."{g}"]: matches no node of the model (its nodes: {eg}, ...)')

    def check_layers(self, num_layers: int) -> None:
        """A ``[layer.N.*]`` override for a layer the model does not have is an error."""
        for li, cls, _ in self.by_layer:
            if not 0 <= li < num_layers:
                raise ConfigError(f"[layer.{li}.{cls}]: the model has {num_layers} layers (0..{num_layers - 1})")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "default": dataclasses.asdict(self.default)}
        d["op"] = {cls: dict(kv) for cls, kv in self.by_class}
        layers: dict[str, dict[str, Any]] = {}
        for li, cls, kv in self.by_layer:
            layers.setdefault(str(li), {})[cls] = dict(kv)
        d["layer"] = layers
        if self.by_type:  # only when used, so a preset's record stays as it was
            d["optype"] = {t: dict(kv) for t, kv in self.by_type}
        if self.by_node:
            d["node"] = {g: dict(kv) for g, kv in self.by_node}
        return d

    @property
    def needs_calibration(self) -> bool:
        """True when lowering needs calibration sentences: static scales or GPTQ weights."""
        return self.any_static or self.uses_gptq

    @property
    def uses_gptq(self) -> bool:
        return self._any("weight_method", "gptq")

    def _any(self, key: str, value: Any) -> bool:
        if getattr(self.default, key) == value:
            return True
        tables = [kv for _, kv in self.by_class + self.by_type + self.by_node] + [kv for *_, kv in self.by_layer]
        return any(dict(kv).get(key) == value for kv in tables)

    @property
    def any_static(self) -> bool:
        """True when some point uses calibrated (static) scales."""
        return self._any("scaling", "static")


def _apply(s: OpSettings, kv: dict[str, Any], where: str) -> OpSettings:
    for k in kv:
        if k not in _FIELD_TYPES:
            raise ConfigError(f"[{where}] unknown key {k!r}; known keys: {', '.join(sorted(_FIELD_TYPES))}")
    try:
        return replace(s, **kv)
    except ConfigError as e:
        raise ConfigError(f"[{where}] {e}") from None


PRESETS: dict[str, dict[str, Any]] = {
    # 8-bit weights and activations in blocks of 32 with power-of-two block exponents found at
    # run time from each block's maximum (leading-zero count); every nonlinearity in integers.
    "w8a8": {
        "default": {
            "weight_bits": 8,
            "act_bits": 8,
            "weight_block": 32,
            "act_block": 32,
            "scaling": "dynamic",
            "gelu_method": "lut",
        },
    },
    # BBCT-like: 4-bit weights with 4-bit stored block exponents, 8-bit block activations.
    # Matmuls: blocks of 128 along K (4.03 bits per weight), codes by GPTQ error feedback from
    # calibration sentences. Embedding tables: blocks of 64 along hidden (4.06 bits; they feed
    # the first error site, emb.sum). With least-squared-error exponents the whole model is
    # 4.05 bits per weight, 7.91x smaller than fp32 (scales included). Chosen on train data.
    "w4a8": {
        "default": {
            "weight_bits": 4,
            "weight_block": 128,
            "weight_exp_bits": 4,
            "weight_clip_search": 2,
            "weight_method": "gptq",
            "act_bits": 8,
            "act_block": 32,
            "scaling": "dynamic",
            "gelu_method": "lut",
        },
        "op": {"embedding": {"weight_block": 64}},
    },
    # MX-style int8: blocks of 32, shared 8-bit power-of-two exponents derived at run time,
    # I-BERT-style polynomial GELU and exp.
    "mx-int8": {
        "default": {
            "weight_bits": 8,
            "act_bits": 8,
            "weight_block": 32,
            "act_block": 32,
            "scaling": "dynamic",
            "gelu_method": "poly",
            "softmax_method": "poly",
        },
    },
    # Calibrated (static) block exponents: no run-time max search, exponents fixed per channel
    # block from the calibration split.
    "w8a8-static": {
        "default": {
            "weight_bits": 8,
            "act_bits": 8,
            "weight_block": 32,
            "act_block": 32,
            "scaling": "static",
            "gelu_method": "lut",
        },
    },
}


def _from_tables(data: dict[str, Any], name: str) -> Config:
    allowed = {"preset", "name", "default", "op", "layer", "optype", "node"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("op", "layer", "optype", "node"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{key} = {data[key]!r}: expected tables [{key}.<name>], not a value")
    base = Config(name=name)
    if "preset" in data:
        p = data["preset"]
        if not isinstance(p, str) or p not in PRESETS:
            raise ConfigError(f"preset={p!r}: expected one of {', '.join(PRESETS)}")
        base = _from_tables(PRESETS[p], p)
    default = base.default
    d = data.get("default", {})
    if not isinstance(d, dict):
        raise ConfigError("[default] must be a table")
    default = _apply(default, d, "default")
    by_class = list(base.by_class)
    for cls, kv in (data.get("op") or {}).items():
        if cls not in OP_CLASSES:
            raise ConfigError(f"[op.{cls}]: unknown op class; known: {', '.join(OP_CLASSES)}")
        if not isinstance(kv, dict):
            raise ConfigError(f"[op.{cls}] must be a table")
        _apply(default, kv, f"op.{cls}")  # validate now, not at first use
        by_class.append((cls, tuple(sorted(kv.items()))))
    by_layer = list(base.by_layer)
    for li, tables in (data.get("layer") or {}).items():
        try:
            layer = int(li)
        except ValueError:
            raise ConfigError(f"[layer.{li}]: layer index must be an integer") from None
        if not isinstance(tables, dict):
            raise ConfigError(f"[layer.{li}] must contain op-class tables")
        for cls, kv in tables.items():
            if cls not in OP_CLASSES:
                raise ConfigError(f"[layer.{li}.{cls}]: unknown op class; known: {', '.join(OP_CLASSES)}")
            if not isinstance(kv, dict):
                raise ConfigError(f"[layer.{li}.{cls}] must be a table")
            _apply(default, kv, f"layer.{li}.{cls}")
            by_layer.append((layer, cls, tuple(sorted(kv.items()))))
    selectors = {}
    for key in ("optype", "node"):
        sel = list(getattr(base, "by_type" if key == "optype" else "by_node"))
        tables = data.get(key) or {}
        if not isinstance(tables, dict):
            raise ConfigError(f"[{key}] must contain tables")
        for k, kv in tables.items():
            where = f"{key}.{k}" if key == "optype" else f'node."{k}"'
            if not isinstance(kv, dict):
                raise ConfigError(f"[{where}] must be a table")
            _apply(default, kv, where)
            sel.append((str(k), tuple(sorted(kv.items()))))
        selectors[key] = tuple(sel)
    return Config(
        name=str(data.get("name", name)),
        default=default,
        by_class=tuple(by_class),
        by_layer=tuple(by_layer),
        by_type=selectors["optype"],
        by_node=selectors["node"],
    )


def load_config(spec: str | Path | dict[str, Any]) -> Config:
    """A preset name (``w8a8``, ``w4a8``, ``mx-int8``), a TOML file path, or a dict of tables."""
    if isinstance(spec, dict):
        return _from_tables(spec, "custom")
    s = str(spec)
    if s in PRESETS:
        return _from_tables(PRESETS[s], s)
    p = Path(s)
    if not p.exists():
        raise ConfigError(f"config {s!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    if p.is_dir():
        raise ConfigError(f"config {p}: is a folder, not a TOML file")
    return _from_tables(read_toml(p), p.stem)


def read_toml(p: Path, what: str = "") -> dict[str, Any]:
    """The tables of the TOML file ``p`` (a config, sweep grid or task file: ``what``); an
    unreadable file, bad UTF-8 or bad TOML is one :class:`ConfigError` line naming the file."""
    of = f" {what}" if what else ""
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML{of}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read{of}: {e.strerror or e}") from None
