"""Lowering of a model's given quantization (ONNX QDQ): float scales become integers here.

A :class:`~bbct.simulator.frontend.fgraph.QuantLinear` (a linear layer whose input and weight
come through ``QuantizeLinear``/``DequantizeLinear``) lowers to::

    x (bbct codes @2^e) -affine_quantize-> c_x = q_x - zp_x      (mult_x * 2^-shift_x ~= 1 / s_x)
    c_x @ (W_q - zp_w) + bias_q  -> acc, exact integers           (== MatMulInteger(q_x, W_q, zp_x, zp_w) + bias_q)
    acc -rescale_channels-> fixed @2^e_out                        (mult_n * 2^-shift_n ~= s_x s_w[n] / 2^e_out)
    -> narrowed as any linear's accumulator (GELU/tanh input, output, activation by the config)

Each float scale becomes a multiplier of ``given_mult_bits`` bits (config, default 24: the
precision of the float32 scale itself) and a shift, once, TFLite-style; rounding at every
shift is the op's ``rounding`` (default ``RND_CONV``, half to even as ``QuantizeLinear``).
The bias is quantized at the accumulator's unit ``s_x * s_w[n]`` (float32 product, as
onnxruntime's quantizer stores a Gemm bias), which gives back a stored int32 bias exactly.

Every other given (static, per-tensor) activation pair is honoured where its tensor is
computed (:func:`honour_output`, called by the emit loop after each rule)::

    value (wide) -[requant to 31 bits]-affine_quantize-> c = q - zp -rescale_channels(m)-> c * m @2^-k

with ``m * 2**-k ~= scale``; the value is not narrowed to bbct's format first, but it has
been rounded before (a GEMM's accumulator times its scale to 2 bits below its finest unit,
a sum to 31 bits over twice the given range), and one more rounding to 31 bits (``2**-30``
of its range) precedes ``affine_quantize`` when it is wider. The codes ``c`` travel beside
the value (``_Emitter.codes``) for the ops that compute on codes: linears, attention
matmuls (exact ``MatMulInteger``), LayerNorm, data movement, a GELU region as one table
(:func:`region_codes`). Pairs inside a
fused node: the product before a bias (``bias_add``), scores before their scale, scores +
mask, embedding partial sums; what stays unhonoured is reported with why (:data:`INSIDE`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from bbct.kernels.blocks import rows_restore, rows_view
from bbct.kernels.formats import EXP_ZERO, IntFormat, QTensor, Rounding, Saturation, ScaleKind
from bbct.kernels.requantize import quantize_multiplier
from bbct.simulator import ir
from bbct.simulator.config import OpSettings
from bbct.simulator.errors import ConfigError, LoweringError
from bbct.simulator.frontend import fgraph as F
from bbct.simulator.lower import SCORES_EXP, _Emitter, _fixed_exp_for_range, _fixed_fmt, _narrow_linear, rule

RESCALE_EXTRA_BITS = 2  # the rescaled accumulator keeps 2 bits below its finest channel unit


def given_weight(e: _Emitter, g: F.GivenQuant, s: OpSettings, axis: int, what: str) -> QTensor:
    """A stored weight or table (``DequantizeLinear`` of integer codes) as bbct's block-scaled
    integer tensor, with the codes and scales as given; nothing is quantized again.

    * blocks: opset 21 ``block_size`` along its axis; a per-channel scale is one block over
      the other axis; a per-tensor scale one block over ``axis`` (every exponent equal);
    * scales: a power-of-two float scale is the block exponent, exactly (POW2). Any other
      scale makes the tensor MULT, ``scale = mant * 2**exp``, once, here: ``mant`` of the
      config's ``weight_mant_bits`` when that width holds every scale exactly (the form of
      bbct's own ``weight_scale="mult"`` weights, so an exported model reads back bit for
      bit), else of ``given_mult_bits`` (exact from 24 bits, a float32's significand;
      narrower: rounded half to even; a table's at most ``31 - bits``, what the embedding
      sum's integer adds take). A block of zero codes at scale 1.0 (bbct's export of
      an all-zero block) takes ``EXP_ZERO``, as bbct's own quantizer gives it;
    * zero points: subtracted once, here, as integer offsets: the codes held are
      ``code - zero_point`` (negated where the scale is negative), one bit wider when a zero
      point, an unsigned type or a negative scale needs it.
    """
    codes = np.asarray(g.codes, np.int64)
    centered = codes - g.per_element(g.zero_point).astype(np.int64)
    negative = np.asarray(g.scale) < 0  # a symmetric quantizer's signed scale: the sign moves to the codes
    centered = np.where(g.per_element(negative), -centered, centered)
    scale = np.abs(np.asarray(g.scale, np.float64))
    if g.block_size:
        b_axis, b_size = g.axis, g.block_size
    elif scale.ndim:
        b_axis, b_size = 1 - g.axis % 2, 0
        scale = scale.reshape([-1 if k == g.axis % 2 else 1 for k in range(2)])
    else:
        b_axis, b_size = axis % 2, 0
        shape = list(codes.shape)
        shape[b_axis] = 1
        scale = np.full(shape, float(scale))
    f, k = np.frexp(scale)  # scale = f * 2**k, f in [0.5, 1): exact
    zero = (_block_amax(centered, b_axis, b_size) == 0) & (scale == 1.0)
    mant = None
    if np.all(f == 0.5):
        exp = k - 1
        mant_bits = 8
    else:
        mant_bits = s.weight_mant_bits
        m = np.ldexp(f, mant_bits)
        if not np.array_equal(m, np.floor(m)):
            mant_bits = s.given_mult_bits
            if axis % 2:  # a table: its lookups feed the integer adds, whose operands hold 31 bits
                mant_bits = min(mant_bits, 31 - (g.bits + 1))
            ms = [quantize_multiplier(float(v), mant_bits) for v in scale.ravel()]
            m = np.array([a for a, _ in ms], np.float64).reshape(scale.shape)
            k = -np.array([b for _, b in ms], np.int64).reshape(scale.shape) + mant_bits
        exp = k - mant_bits
        mant = np.where(zero, 1 << (mant_bits - 1), m).astype(np.int64)
    exp = np.where(zero, EXP_ZERO, exp).astype(np.int32)
    bits = g.bits + (0 if g.signed and not np.any(np.asarray(g.zero_point)) and not negative.any() else 1)
    fmt = IntFormat(
        bits=max(2, bits),
        signed=True,
        block_axis=b_axis,
        block_size=b_size,
        scale=ScaleKind.POW2 if mant is None else ScaleKind.MULT,
        mant_bits=mant_bits,
        rounding=Rounding.RND_CONV,
        saturation=Saturation.SAT,
    )
    q = QTensor(
        np.ascontiguousarray(centered.astype(fmt.dtype)), fmt, np.ascontiguousarray(exp), mant, {"given": g.source}
    )
    real = exp[exp != EXP_ZERO]
    span = int(real.max() - real.min()) if real.size else 0
    exp_bits = s.weight_exp_bits if span < 1 << s.weight_exp_bits else span.bit_length()
    e.storage.append(
        {
            "name": what,
            "numel": int(codes.size),
            "bits": int(bits),
            "scale_bits": int(exp.size) * (exp_bits + (mant_bits if mant is not None else 0)),
            "matrix": True,
        }
    )
    return q


def _block_amax(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """max |x| per block (blocks of ``block_size`` along ``axis``, 0: the whole axis)."""
    rows, moved = rows_view(np.abs(x), axis)
    n = rows.shape[1]
    bs = n if block_size <= 0 or block_size >= n else block_size
    nb = -(-n // bs)
    rows = np.concatenate([rows, np.zeros((rows.shape[0], nb * bs - n), rows.dtype)], axis=1)
    return rows_restore(rows.reshape(rows.shape[0], nb, bs).max(axis=2), moved, axis)


def centered_weight(wq: F.GivenQuant) -> np.ndarray:
    """``W_q - zp_w`` (K, N) as int64; per-channel zero points along axis 1."""
    z = np.asarray(wq.zero_point, np.int64)
    return np.ascontiguousarray(wq.codes.astype(np.int64) - (z.reshape(1, -1) if z.ndim else z))


def channel_scales(n: F.QuantLinear) -> np.ndarray:
    """The accumulator's unit per output channel: ``s_x * s_w[n]`` (float32 product, float64)."""
    sw = np.broadcast_to(np.asarray(n.w_quant.scale, np.float32), (n.out_features,))
    return (np.float32(n.x_quant.scale) * sw).astype(np.float64)


def _count_weight(e: _Emitter, short: str, w: np.ndarray, wq: F.GivenQuant) -> None:
    """Storage of a given weight: its codes at their width, one float32 scale per channel."""
    n_scales = int(np.asarray(wq.scale).size)
    e.storage.append(
        {"name": short, "numel": int(w.size), "bits": wq.bits, "scale_bits": 32 * n_scales, "matrix": True}
    )


@rule(F.QuantLinear)
def _quant_linear(e: _Emitter, n: F.QuantLinear) -> str:
    r = e.role(n)
    s = e.settings(n)
    xq, wq = n.x_quant, n.w_quant
    if xq.dynamic:
        return _dynamic_linear(e, n)
    x = e.value[n.inputs[0]]
    mult, shift = quantize_multiplier(1.0 / float(xq.scale), s.given_mult_bits)
    zp = int(xq.zero_point)
    key = ("affine", x, mult, shift, zp, xq.qmin, xq.qmax, s.rounding_mode)
    have = e.codes.get(x)
    if have is not None and have[1].same_grid(xq):  # the input is these codes already
        e.aligned[key] = have[0]
    elif key not in e.aligned and out_bits(e.by_name.get(x)) > AFFINE_IN_BITS:  # a wide value: 31 bits first
        x = e.add(ir.Requant(name=e.unique(e.role(n).short + ".in.wide"), inputs=(x,), fmt=_fixed_fmt(31, s)))
    xa = _input_quantizer(
        e,
        n,
        key,
        lambda name: ir.AffineQuantize(
            name=name,
            inputs=(x,),
            multiplier=mult,
            shift=shift,
            zero_point=zp,
            qmin=xq.qmin,
            qmax=xq.qmax,
            rounding=s.rounding_mode,
            given=f"{xq.short()} from {xq.source}",
        ),
    )
    w = centered_weight(wq)
    unit = channel_scales(n)
    cx = max(abs(xq.qmin - zp), abs(xq.qmax - zp))
    if n.mid_given is not None and n.bias is not None:
        return _product_then_bias(e, n, xa, w, unit, cx)
    bias = None
    if n.bias is not None:
        bias = np.rint(np.asarray(n.bias, np.float64) / unit).astype(np.int64)
        if bias.size and int(np.abs(bias).max()) >= 1 << (s.bias_bits - 1):
            raise ConfigError(
                f"node {r.short}: bias code {int(np.abs(bias).max())} at the given scale s_x*s_w needs more than "
                f"bias_bits={s.bias_bits}"
            )
    if bias is not None:
        e.count(r.short + ".bias", bias.size, s.bias_bits, 0, None)
    return _gemm_rescale(e, n, xa, w, (bias, 0), unit, cx, relative=False)


BIAS_ADD_BITS = 48  # the product's value (at most 30 bits) plus a bias at its exponent


def _product_then_bias(e: _Emitter, n: F.QuantLinear, xa: str, w: np.ndarray, unit: np.ndarray, cx: int) -> str:
    """``DQ(Q(x @ W)) + b``: the exact GEMM without bias, rescaled and quantized to the
    product's given codes, their value at exponent ``-k`` (``dequantize``), then the float
    bias brought to that exponent once here, ``round(b * 2**k)`` half to even, and added
    (``bias_add``); the sum is narrowed like any linear's accumulator."""
    r, s, g = e.role(n), e.settings(n), n.mid_given
    y = _gemm_rescale(e, n, xa, w, (None, 0), unit, cx, relative=False, narrow=False)
    codes = affine(e, r.short + ".xw", y, g, s)
    for t, (gt, producer) in (e.fg.info.get("given_activations") or {}).items():
        if gt is g and producer in n.sources:
            e.given_done[t] = "product before the bias"
    v = dequantize(e, r.short + ".xw", codes, g, s, None)
    k = -int(e.by_name[v].e_out)
    bias = np.rint(np.ldexp(np.asarray(n.bias, np.float64), k)).astype(np.int64)
    if bias.size and int(np.abs(bias).max()) >= 1 << (BIAS_ADD_BITS - 2):
        raise ConfigError(
            f"node {r.short}: bias {float(np.abs(n.bias).max()):.6g} at 2**{-k} needs more than "
            f"{BIAS_ADD_BITS - 2} bits"
        )
    e.count(r.short + ".bias", bias.size, BIAS_ADD_BITS, 0, None)
    yb = e.add(ir.BiasAdd(name=r.short + ".biased", inputs=(v,), bias=bias, fmt=_fixed_fmt(BIAS_ADD_BITS, s)))
    return _narrow_linear(e, n, yb)


def _input_quantizer(e: _Emitter, n: F.QuantLinear, key: tuple, make: Callable[[str], ir.Node]) -> str:
    """The node quantizing a linear's input, made once for the linears that share it (Q, K, V)."""
    if key not in e.aligned:
        src = e.prod.get(n.inputs[0])
        base = e.roles[src.name].short if src is not None else n.inputs[0]
        e.aligned[key] = e.add(make(e.unique(f"{base}.q")))
    return e.aligned[key]


def _dynamic_linear(e: _Emitter, n: F.QuantLinear) -> str:
    """``DynamicQuantizeLinear`` + ``MatMulInteger`` + scale ``Mul``: the run-time float scale
    has no integer-only equivalent, so the input takes the nearest integer scheme, a
    power-of-two scale from the integer range (``dynamic_quantize``); the accumulator's unit
    is then ``2**k * s_w[n]`` with ``k`` known at run time, so the per-channel multipliers
    come from the weight scales alone and the run-time ``k`` is a shift."""
    r = e.role(n)
    s = e.settings(n)
    wq = n.w_quant
    x = e.value[n.inputs[0]]
    given = f"DynamicQuantizeLinear {n.x_quant.source}"
    xa = _input_quantizer(
        e,
        n,
        ("dynamic", x, s.rounding_mode),
        lambda name: ir.DynamicQuantize(name=name, inputs=(x,), rounding=s.rounding_mode, given=given),
    )
    w = centered_weight(wq)
    unit = np.broadcast_to(np.asarray(wq.scale, np.float32), (n.out_features,)).astype(np.float64)
    bias, bias_exp = None, 0
    if n.bias is not None:  # at the unit s_w[n] * 2**bias_exp; the GEMM shifts it to 2**k
        b = np.asarray(n.bias, np.float64) / unit
        amax = float(np.abs(b).max(initial=0.0))
        bias_exp = _fixed_exp_for_range(s.bias_bits, amax) if amax > 0 else 0
        bias = np.rint(b / 2.0**bias_exp).astype(np.int64)
        e.count(r.short + ".bias", bias.size, s.bias_bits, 0, None)
    return _gemm_rescale(e, n, xa, w, (bias, bias_exp), unit, 255, relative=True)


def _gemm_rescale(
    e: _Emitter,
    n: F.QuantLinear,
    xa: str,
    w: np.ndarray,
    bias: tuple[np.ndarray | None, int],
    unit: np.ndarray,
    cx: int,
    relative: bool,
    narrow: bool = True,
) -> str:
    """The exact integer GEMM of centered codes (``|x| <= cx``), then the accumulator, in
    units of ``unit[n]`` (times ``2**k`` at run time when ``relative``), brought to a
    power-of-two exponent 2 bits below the finest unit by one multiplier per channel."""
    r = e.role(n)
    s = e.settings(n)
    codes, bias_exp = bias
    _count_weight(e, r.short, w, n.w_quant)
    acc = e.add(
        ir.Linear(
            name=r.short + ".acc",
            inputs=(xa,),
            weight=ir.narrow_ints(w),
            w_exp=0,
            bias=codes,
            bias_exp=bias_exp,
            bias_bits=s.bias_bits,
            acc_bits=s.acc_bits,
            acc_saturation=s.acc_saturation_mode,
            bias_rounding=s.rounding_mode,
        )
    )
    bound = n.in_features * cx * int(np.abs(w).max(initial=0))
    bound += int(np.abs(codes).max(initial=0)) << max(0, bias_exp) if codes is not None else 0
    if bound.bit_length() + s.given_mult_bits > 62:  # the accumulator times a multiplier: int64 datapath
        raise ConfigError(
            f"node {r.short}: accumulator of up to {bound.bit_length()} bits times a {s.given_mult_bits}-bit "
            f"multiplier exceeds the int64 datapath: lower given_mult_bits to {62 - bound.bit_length()}"
        )
    e_out = math.floor(math.log2(float(unit.min()))) - RESCALE_EXTRA_BITS
    ms = [quantize_multiplier(float(u), s.given_mult_bits) for u in unit]
    out_bits = (bound * float(unit.max()) / 2.0**e_out).__ceil__().bit_length() + 1
    y = e.add(
        ir.RescaleChannels(
            name=r.short + ".rescaled",
            inputs=(acc,),
            multiplier=np.array([m for m, _ in ms], np.int64),
            shift=np.array([sh for _, sh in ms], np.int64),
            e_out=e_out,
            relative=relative,
            fmt=_fixed_fmt(min(62, max(s.acc_bits, out_bits)), s),
        )
    )
    return _narrow_linear(e, n, y) if narrow else y


# -- given activations: a Q/DQ pair honoured where its tensor is computed --------------------------
AFFINE_IN_BITS = 31  # affine_quantize reads |x| < 2**31: a wider value is first narrowed to 31 bits


def given_at(e: _Emitter, name: str) -> F.GivenQuant | None:
    """The given (static, per-tensor) quantization of float tensor ``name``, or None."""
    g = (e.fg.info.get("given_activations") or {}).get(name)
    return None if g is None or g[0].dynamic else g[0]


def quantized_next(e: _Emitter, name: str) -> bool:
    """Float tensor ``name`` is quantized to given codes next: its own given quantization, or
    every reader is a linear that quantizes its input to given codes, or data movement whose
    output is quantized next. Its producer then skips its own narrowing (bbct's format): the
    given codes are rounded from the wide value (itself rounded at most twice before, see the
    module docstring), as ``QuantizeLinear`` rounds a float."""
    if given_at(e, name) is not None:
        return True
    users = e.cons.get(name, [])
    return (
        bool(users)
        and name not in e.fg.outputs
        and all(
            (isinstance(u, F.QuantLinear) and not u.x_quant.dynamic)
            or (isinstance(u, (F.SplitHeads, F.MergeHeads, F.TakeRow)) and quantized_next(e, u.name))
            for u in users
        )
    )


def given_range(g: F.GivenQuant) -> float:
    """Largest |value| the given codes represent."""
    return max(abs(g.qmin - int(g.zero_point)), abs(g.qmax - int(g.zero_point))) * float(g.scale)


def out_bits(node: ir.Node | None) -> int:
    """Signed width of an integer node's output (62 when unknown)."""
    for attr in ("fmt", "out_fmt"):
        f = getattr(node, attr, None)
        if f is not None:
            return f.bits + (0 if f.signed else 1)
    if isinstance(node, (ir.AffineQuantize, ir.CodeTable)):
        return node.bits
    return int(getattr(node, "acc_bits", 62))


def affine(e: _Emitter, base: str, x: str, g: F.GivenQuant, s: OpSettings) -> str:
    """``x`` quantized to the given codes (centered ``q - zp``, exponent 0, unit the given
    scale): ``affine_quantize`` with ``1 / scale`` as a ``given_mult_bits`` multiplier."""
    if out_bits(e.by_name.get(x)) > AFFINE_IN_BITS:  # one rounding 2**-30 below the value's range
        x = e.add(ir.Requant(name=e.unique(base + ".wide"), inputs=(x,), fmt=_fixed_fmt(AFFINE_IN_BITS, s)))
    mult, shift = quantize_multiplier(1.0 / float(g.scale), s.given_mult_bits)
    return e.add(
        ir.AffineQuantize(
            name=e.unique(base + ".q"),
            inputs=(x,),
            multiplier=mult,
            shift=shift,
            zero_point=int(g.zero_point),
            qmin=g.qmin,
            qmax=g.qmax,
            rounding=s.rounding_mode,
            given=f"{g.short()} from {g.source}",
        )
    )


def dequantize(e: _Emitter, base: str, codes: str, g: F.GivenQuant, s: OpSettings, onnx: str | None) -> str:
    """The value of centered codes, ``c * scale``, as a fixed-point tensor: ``scale`` as a
    multiplier ``m * 2**-k`` of ``given_mult_bits`` bits (at most ``30 - code bits``, so the
    value stays an operand of the integer adds), ``c * m`` exact at exponent ``-k``. The codes
    travel with the value (``e.codes``) for the ops that compute on codes."""
    cb = out_bits(e.by_name[codes])
    mb = max(1, min(s.given_mult_bits, AFFINE_IN_BITS - 1 - cb))
    m, k = quantize_multiplier(float(g.scale), mb)
    v = e.add(
        ir.RescaleChannels(
            name=e.unique(base + ".dq"),
            inputs=(codes,),
            onnx_name=onnx,
            multiplier=np.array([m], np.int64),
            shift=np.array([k], np.int64),
            e_out=-k,
            fmt=_fixed_fmt(cb + mb, s),
        )
    )
    e.codes[v] = (codes, g)
    return v


def honour_output(e: _Emitter, n: F.FNode, y: str) -> str:
    """Node ``n``'s value ``y`` quantized to the codes its model gives its output tensor: the
    rounding to the given grid (the rules skip their own narrowing for such outputs, see
    ``_Emitter.requant``); downstream reads the codes' exact value. Data movement of codes
    already on that grid (heads split or merged, a row taken) passes them unchanged."""
    g = given_at(e, n.name)
    have = e.codes.get(y)
    if have is not None and have[1].same_grid(g):  # codes moved (or made by a table) on this grid
        e.given_done[n.name] = KINDS.get(type(n), n.op)
        return y
    r, s = e.role(n), e.settings(n)
    codes = affine(e, r.short, y, g, s)
    e.given_done[n.name] = KINDS.get(type(n), n.op)
    return dequantize(e, r.short, codes, g, s, n.name)


def region_codes(e: _Emitter, n: F.Gelu, codes: str) -> str:
    """A unary region whose input, output and inner tensors all have given codes, as one
    table over the input codes (``code_table``; made at import, see ``Gelu.table``): every
    inner Q/DQ pair is honoured exactly as the model computes it."""
    r, s = e.role(n), e.settings(n)
    gi, go = n.table_in, given_at(e, n.name)
    zi, zo = int(gi.zero_point), int(go.zero_point)
    table = np.asarray(n.table, np.int64) - zo
    bits = max(abs(go.qmin - zo), abs(go.qmax - zo)).bit_length() + 1
    y = e.add(
        ir.CodeTable(
            name=r.short + ".table",
            inputs=(codes,),
            table=table,
            c_lo=gi.qmin - zi,
            bits=bits,
            given=f"{gi.short()} -> {go.short()} from {go.source}",
        )
    )
    for t, _ in inner_given(e, n):
        e.given_done[t] = "inside the GELU (one table over the input codes)"
    e.given_done[n.name] = KINDS[type(n)]
    e.count(r.short + ".table", table.size, bits, 0, None)
    return dequantize(e, r.short, y, go, s, n.name)


def inner_given(e: _Emitter, n: F.FNode) -> list[tuple[str, F.GivenQuant]]:
    """Given (static) quantizations of tensors inside fused node ``n`` (computed by one of
    the ONNX nodes it stands for, other than its output)."""
    return [
        (t, g)
        for t, (g, producer) in (e.fg.info.get("given_activations") or {}).items()
        if producer in n.sources and t != n.name and not g.dynamic
    ]


def scores_of_codes(e: _Emitter, n: F.Scores, acc: str, unit: float, bits: int, exp: int, s: OpSettings) -> str:
    """Scores from the exact product of Q and K codes (``acc`` in units of ``unit``): when the
    model gives the product's codes before the scale (a Q/DQ pair between the MatMul and
    its Mul), it is quantized to them first; then one rescale by every scale to ``exp``."""
    r = e.role(n)
    inner = inner_given(e, n)
    if len(inner) == 1:
        t, g = inner[0]
        fine = rescale_to(
            e, r.short + ".qk", acc, unit, AFFINE_IN_BITS, fine_exp(AFFINE_IN_BITS, 2 * given_range(g)), s
        )
        acc, unit = affine(e, r.short + ".qk", fine, g, s), float(np.float32(g.scale))
        e.given_done[t] = "attention scores before the scale"
    return rescale_to(e, r.short, acc, unit * float(n.scale), bits, exp, s)


def given_masked_scores(e: _Emitter, n: F.Softmax, inputs: list[str], s: OpSettings) -> list[str]:
    """Softmax inputs ``[scores, mask]``; when the model gives the codes of scores + mask (a
    Q/DQ pair on the Add that ``softmax`` fused), the unmasked scores are quantized to them
    (a mask element adds 0 there) and the mask stays the softmax's (a masked probability is
    0). onnxruntime clips a masked element to the range's floor and takes its ``exp()``: at
    most ``exp(-(qmax - qmin) * scale)`` of the row's sum, so it rounds to probability 0 at
    step ``s_prob`` (the probabilities' given step, else bbct's LSB) for every row of up to
    ``S`` keys only when ``(qmax - qmin) * scale >= ln(2 * S / s_prob)``; a narrower given
    range (calibrated without padding, say) is refused (:class:`LoweringError`)."""
    inner = inner_given(e, n)
    if len(inner) != 1:
        return inputs
    t, g = inner[0]
    keys = masked_keys_bound(e)
    gp = given_at(e, n.name)
    s_prob = float(np.float32(gp.scale)) if gp is not None else 2.0**-s.softmax_out_bits
    width = (g.qmax - g.qmin) * float(np.float32(g.scale))
    need = math.log(2 * keys / s_prob)
    if width < need:
        raise LoweringError(
            f"node {n.sources[0] if n.sources else n.name!r} (Softmax): the given codes of attention scores + "
            f"mask on {t!r} span {width:.3g}, under ln(2 * {keys} keys / probability step {s_prob:.3g}) = "
            f"{need:.3g}: onnxruntime would give a masked element a nonzero probability, bbct gives 0"
        )
    base = e.role(n).short + ".masked"
    codes = affine(e, base, inputs[0], g, s)
    e.given_done[t] = "attention scores + mask"
    v = dequantize(e, base, codes, g, s, None)
    return [to_fixed(e, base, v, s.softmax_in_bits, SCORES_EXP, s, 4), *inputs[1:]]


def masked_keys_bound(e: _Emitter) -> int:
    """The most keys an attention row can have: the graph's ``max_positions``, else the
    rows of the lowered position embedding table, else 512."""
    bound = e.fg.info.get("max_positions")
    pos = e.by_name.get("emb.position")
    if bound is None and isinstance(pos, ir.Embed):
        bound = int(pos.table.shape[0])
    return int(bound or 512)


def to_fixed(e: _Emitter, base: str, x: str, bits: int, exp: int, s: OpSettings, ndim: int) -> str:
    """A value (a dequantized given tensor) narrowed to a fixed format at exponent ``exp``,
    as a table kernel (softmax, GELU, tanh) reads its input."""
    return e.add(
        ir.Requant(
            name=e.unique(base + ".fixed"),
            inputs=(x,),
            fmt=_fixed_fmt(bits, s),
            exp=np.full((1,) * ndim, exp, np.int32),
        )
    )


def moved_codes(e: _Emitter, x: str, y: str, make: Callable[[str, str], ir.Node]) -> None:
    """Data movement ``make(name, input)`` of value ``x`` into ``y``: the same movement of
    ``x``'s codes, so ``y`` carries codes too."""
    have = e.codes.get(x)
    if have is not None:
        e.codes[y] = (e.add(make(e.unique(y + ".codes"), have[0])), have[1])


def codes_matmul(e: _Emitter, n: F.FNode, a: str, b: str, s: OpSettings) -> tuple[str, float] | None:
    """``a @ b`` of two values that carry given codes: the exact integer product of the
    centered codes (``MatMulInteger`` of the same codes) and its unit ``s_a * s_b``; None when
    either operand has no codes."""
    ca, cb = e.codes.get(a), e.codes.get(b)
    if ca is None or cb is None:
        return None
    r = e.role(n)
    acc = e.add(
        ir.MatMul(
            name=e.unique(r.short + ".codes.acc"),
            inputs=(ca[0], cb[0]),
            acc_bits=s.acc_bits,
            acc_saturation=s.acc_saturation_mode,
        )
    )
    return acc, float(np.float32(ca[1].scale)) * float(np.float32(cb[1].scale))


def rescale_to(e: _Emitter, name: str, acc: str, unit: float, bits: int, exp: int, s: OpSettings) -> str:
    """An accumulator in units of ``unit`` to a fixed format at exponent ``exp``."""
    mult, shift = quantize_multiplier(unit, s.given_mult_bits)
    return e.add(ir.Rescale(name=name, inputs=(acc,), multiplier=mult, shift=shift, e_out=exp, fmt=_fixed_fmt(bits, s)))


def fine_exp(bits: int, amax: float) -> int:
    """The exponent of a ``bits``-wide fixed format holding ``|x| <= amax``."""
    return _fixed_exp_for_range(bits, max(amax, 2.0**-60))


def given_sum_format(g: F.GivenQuant, s: OpSettings, ndim: int) -> tuple[IntFormat, np.ndarray]:
    """Format and exponent of a sum whose result has given codes ``g``: ``AFFINE_IN_BITS``
    wide over twice the given range (the sum rounded once there, then to the codes)."""
    fmt = _fixed_fmt(AFFINE_IN_BITS, s)
    return fmt, np.full((1,) * ndim, fine_exp(fmt.bits, 2 * given_range(g)), np.int32)


def given_static_exp(given: dict, fmt: IntFormat, s: OpSettings) -> np.ndarray | None:
    """Block exponents of an activation from its given per-channel power-of-two scales
    (:func:`bbct.simulator.export.read_static_activations`), or None when they are not one
    exponent per block of ``fmt`` at its width."""
    exp = np.asarray(given["exp"], np.int64)
    bs = exp.size if fmt.block_size <= 0 or fmt.block_size >= exp.size else fmt.block_size
    blocks = exp[::bs]
    if given["bits"] != (8 if fmt.bits <= 8 else 16) or not np.array_equal(np.repeat(blocks, bs)[: exp.size], exp):
        return None
    return blocks.astype(np.int32)


KINDS = {  # what a given activation is, by the float node that computes it
    F.Linear: "linear output",
    F.QuantLinear: "linear output",
    F.Add: "residual sum",
    F.LayerNorm: "LayerNorm output",
    F.Gelu: "GELU output",
    F.Tanh: "tanh output",
    F.Relu: "ReLU output",
    F.Scores: "attention scores",
    F.Softmax: "attention probabilities",
    F.MatMul: "attention context",
    F.MergeHeads: "merged heads",
    F.SplitHeads: "attention heads",
    F.EmbeddingSum: "embedding sum",
    F.Embedding: "embedding lookup",
    F.TakeRow: "first row",
    F.MeanPool: "mean pool",
    F.L2Normalize: "L2 normalization",
}
_BEFORE_BIAS = (
    "the MatMul output before the bias: bbct adds the bias in the exact accumulator and rounds once, "
    "at the linear's output"
)
INSIDE = {  # why a given quantization inside a fused node is not honoured
    F.Linear: _BEFORE_BIAS,
    F.QuantLinear: _BEFORE_BIAS,
    F.Gelu: "inside the GELU: bbct's GELU kernel computes x * Phi(x) in one piece from its input",
    F.Scores: "inside the scaled scores: bbct rescales the exact product Q.K^T once by every scale",
    F.Softmax: "inside the softmax",
    F.EmbeddingSum: "a partial sum of the embedding lookups: bbct adds the stored codes exactly and rounds once",
    F.LayerNorm: "inside the LayerNorm",
}


def given_report(
    fg: F.FGraph,
    static: dict[str, str] | None = None,
    static_notes: dict[str, str] | None = None,
    done: dict[str, str] | None = None,
) -> dict[str, object]:
    """Which tensors' quantization the model gave (and bbct honours), and which it did not."""
    honoured, weights, acts = {}, {}, {}
    for n in fg.nodes:
        if isinstance(n, F.QuantLinear):
            honoured[n.name] = f"input {n.x_quant.short()}, weight {n.w_quant.short()}"
        given = [(n.weight_name, n.w_given)] if isinstance(n, F.Linear) and not isinstance(n, F.QuantLinear) else []
        given += [(n.table_name, n.given)] if isinstance(n, F.Embedding) else []
        given += (
            list(zip(n.table_names, n.givens, strict=False)) if isinstance(n, F.EmbeddingSum) else []
        )  # () or one per table
        for name, g in given:
            if g is not None:
                weights[name] = f"{g.short()} from {g.source}: codes and scales as stored"
    not_honoured = dict(fg.info.get("quant_not_honoured") or {})
    prod = fg.producers()
    for t, (g, producer) in (fg.info.get("given_activations") or {}).items():
        where = prod.get(t)
        holder = where or next((f for f in fg.nodes if producer in f.sources), None)
        if done is not None and t in done:
            acts[t] = f"{done[t]}: {g.short()} from {g.source}"
        elif done is not None or where is None:
            why = INSIDE.get(type(holder), f"inside {holder.op}" if holder is not None else "removed by a rewrite")
            if g.dynamic:
                why = "a run-time float scale (DynamicQuantizeLinear): no integer-only equivalent"
            elif where is not None:
                why = "not reached by the lowering"
            not_honoured[t] = f"{g.short()} from {g.source}: {why}"
    exact = dict(fg.info.get("given_exact") or {})
    out = {"honoured": honoured, "not_honoured": {**not_honoured, **(static_notes or {})}}
    if acts:
        out["activations"] = acts
    if exact:
        out["exact"] = exact
    if weights:
        out["weights"] = weights
    if static:
        out["static_exponents"] = dict(static)
    return out


def format_given(info: dict) -> str:
    """The report's lines on given quantization ('' for a float model): which tensors'
    quantization the model gave and bbct honours, and which bbct's config chose instead."""
    g = info.get("given_quantization") or {}
    honoured, other = g.get("honoured", {}), g.get("not_honoured", {})
    weights, static = g.get("weights", {}), g.get("static_exponents", {})
    acts, exact = g.get("activations", {}), g.get("exact", {})
    if not honoured and not other and not weights and not static and not acts and not exact:
        return ""
    parts = [f"{len(honoured)} linear layers"] if honoured or not (weights or static or acts or exact) else []
    if acts:
        kinds: dict[str, int] = {}
        for v in acts.values():
            k = v.split(":", 1)[0]
            kinds[k] = kinds.get(k, 0) + 1
        parts.append(f"{len(acts)} activations: " + ", ".join(f"{c} {k}" for k, c in kinds.items()))
    parts += [f"{len(exact)} exact data movements"] if exact else []
    parts += [f"{len(weights)} stored weights"] if weights else []
    parts += [f"{len(static)} static activation exponents"] if static else []
    lines = [f"given quantization honoured ({'; '.join(parts)}; every other tensor: bbct's config):"]
    lines += [f"  {k}: {v}" for d in (honoured, acts, exact, weights, static) for k, v in d.items()]
    if other:
        lines.append(f"given quantization not honoured ({len(other)} tensors, bbct's config instead):")
        lines += [f"  {k}: {v}" for k, v in other.items()]
    return "\n".join(lines)
