"""Lowering: a float :class:`BertSpec` + a :class:`Config` -> the integer :class:`Graph`.

This is the one place where floats become integers: weights are quantized to their block
formats and aligned for the MAC array, biases get an exponent, nonlinear kernels get their
integer constants and tables, static activation exponents come from calibration statistics.

The integer dataflow of one encoder layer (``act`` = block-scaled activation format)::

    x(act) -align-> linear(Wq|Wk|Wv) -requant-> q,k,v(act)
    q -align(row)-> heads ; k,v -align(sequence)-> heads
    Q K^T -rescale(1/sqrt d)-> s16 ; + mask ; softmax -> u8 P
    P V -merge heads-requant-> context(act) -align-> linear(Wo) -requant-> (act)
    x + attn -> residual(s16 blocks) -align-> layernorm -requant-> h(act)
    h -align-> linear(W1) -requant(fixed)-> gelu -requant-> (act) -align-> linear(W2) -> (act)
    h + ffn -> residual -align-> layernorm -requant-> x'(act)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bbct.kernels.align import align
from bbct.kernels.formats import IntFormat, QTensor, Rounding, Saturation, ScaleKind
from bbct.kernels.gelu import make_gelu_lut, make_gelu_poly
from bbct.kernels.layernorm import make_layernorm_params
from bbct.kernels.quantize import block_exponents, exponent_window, gptq, mse_exponents, quantize
from bbct.kernels.requantize import quantize_multiplier
from bbct.kernels.softmax import make_softmax_params
from bbct.kernels.tanh import make_tanh_lut
from bbct.simulator import ir
from bbct.simulator import spec as S
from bbct.simulator.config import Config, OpSettings
from bbct.simulator.errors import LoweringError


@dataclass
class Calibration:
    """Per-channel max |x| (over calibration tokens) at each activation point, by point name;
    and, for GPTQ weights, each linear's input second moments ``sum x x^T`` by linear name."""

    amax: dict[str, np.ndarray] = field(default_factory=dict)
    sentences: int = 0
    hessians: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, point: str) -> np.ndarray | None:
        return self.amax.get(point)


def linear_names(spec: S.BertSpec) -> dict[int, str]:
    """``id(linear) ->`` its key in :attr:`Calibration.hessians` (``L0.q.acc``, ...): the
    calibration and the lowering of GPTQ weights both name a linear by this."""
    names: dict[int, str] = {}
    for i, layer in enumerate(spec.layers):
        at, p = layer.attention, f"L{i}."
        for role, lin in (("q", at.q), ("k", at.k), ("v", at.v), ("attn_out", at.out)):
            names[id(lin)] = p + role + ".acc"
        names[id(layer.intermediate)] = p + "ffn1.acc"
        names[id(layer.output)] = p + "ffn2.acc"
    if spec.pooler is not None:
        names[id(spec.pooler)] = "pooler.acc"
    if spec.classifier is not None:
        names[id(spec.classifier)] = "classifier.acc"
    return names


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


class _Lowerer:
    def __init__(self, spec: S.BertSpec, config: Config, calib: Calibration | None) -> None:
        self.spec = spec
        self.cfg = config
        self.calib = calib
        self.hessian_keys = linear_names(spec)
        self.nodes: list[ir.Node] = []
        self.storage: list[dict] = []  # one entry per stored parameter, for compression
        self.fallbacks: list[str] = []

    def add(self, node: ir.Node) -> str:
        self.nodes.append(node)
        return node.name

    # -- parameters -------------------------------------------------------------------
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

    def quant_weight(self, w: np.ndarray, s: OpSettings, axis: int, what: str, lin: S.Linear | None = None) -> QTensor:
        """Weight codes; ``lin`` given (a matmul), GPTQ applies when the settings ask for it."""
        fmt = self.weight_fmt(s, axis)
        w = np.asarray(w, dtype=np.float64)
        if s.weight_method == "gptq" and lin is not None:
            key = self.hessian_keys.get(id(lin))
            h = self.calib.hessians.get(key) if self.calib is not None and key else None
            if h is None:
                raise LoweringError(
                    f"node {what}: weight_method='gptq' needs calibration data with input statistics "
                    "(run with calibration sentences, or use weight_method='rtn')"
                )
            q = gptq(w, fmt, h, s.weight_clip_search, act_order=s.weight_order == "act", exp_bits=s.weight_exp_bits)
            self.count(what, w.size, s.weight_bits, int(np.asarray(q.exp).size), s)
            return q
        if s.weight_clip_search and fmt.scale == ScaleKind.POW2:
            exp, mant = mse_exponents(w, fmt, s.weight_clip_search), None
        else:
            exp, mant = block_exponents(w, fmt)
        # the stored exponents must fit weight_exp_bits (what compression counts)
        q = quantize(w, fmt, exponent_window(exp, s.weight_exp_bits), mant)
        self.count(what, w.size, s.weight_bits, int(np.asarray(q.exp).size), s)
        return q

    def linear(self, name: str, x: str, lin: S.Linear, s: OpSettings, onnx: str | None = None) -> str:
        stored = self.quant_weight(lin.weight, s, axis=0, what=name, lin=lin)
        wide, ew = align(stored, reduce_axes=(0, 1), guard=s.weight_guard, rounding=Rounding.RND_CONV)
        bias = None
        bias_exp = 0
        if lin.bias is not None:
            b = np.asarray(lin.bias, dtype=np.float64)
            amax = float(np.max(np.abs(b)))
            bias_exp = _fixed_exp_for_range(s.bias_bits, amax) if amax > 0 else 0
            bq = quantize(
                b.reshape(1, -1),
                IntFormat(bits=s.bias_bits, block_size=0, rounding=Rounding.RND_CONV),
                exp=np.array([[bias_exp]], dtype=np.int32),
            )
            bias = bq.data.reshape(-1).astype(np.int64)
            self.count(name + ".bias", b.size, s.bias_bits, 0, None)
        return self.add(
            ir.Linear(
                name=name,
                inputs=(x,),
                onnx_name=onnx,
                weight=np.ascontiguousarray(wide.astype(np.int64)),
                w_exp=int(np.asarray(ew).ravel()[0]),
                stored=stored,
                bias=bias,
                bias_exp=bias_exp,
                bias_bits=s.bias_bits,
                acc_bits=s.acc_bits,
                acc_saturation=s.acc_saturation_mode,
                bias_rounding=s.rounding_mode,
            )
        )

    # -- activations ------------------------------------------------------------------
    def static_exp(self, point: str, fmt: IntFormat, s: OpSettings, ndim: int) -> np.ndarray | None:
        """Calibrated block exponents for ``point`` or None (dynamic) with the reason recorded."""
        if s.scaling != "static":
            return None
        amax = self.calib.get(point) if self.calib is not None else None
        if amax is None:
            if self.calib is None:
                raise LoweringError(
                    f"point {point}: scaling='static' needs calibration data (run with calibration "
                    "sentences, or use scaling='dynamic')"
                )
            self.fallbacks.append(point)
            return None
        a = np.asarray(amax, dtype=np.float64).reshape((1,) * (ndim - 1) + (-1,))
        exp, _ = block_exponents(a, IntFormat(bits=fmt.bits, block_axis=-1, block_size=fmt.block_size))
        return np.asarray(exp, dtype=np.int32)

    def requant(
        self, name: str, x: str, s: OpSettings, point: str, ndim: int, onnx: str | None, bits: int | None = None
    ) -> str:
        fmt = _act_fmt(s, bits)
        return self.add(
            ir.Requant(name=name, inputs=(x,), onnx_name=onnx, fmt=fmt, exp=self.static_exp(point, fmt, s, ndim))
        )

    def align(self, name: str, x: str, s: OpSettings, axes: tuple[int, ...] = (-1,), guard: int | None = None) -> str:
        g = s.act_guard if guard is None else guard
        return self.add(ir.Align(name=name, inputs=(x,), reduce_axes=axes, guard=g, rounding=s.rounding_mode))

    def layernorm(self, name: str, x: str, ln: S.LayerNorm, layer: int | None, point: str) -> str:
        s = self.cfg.settings("layernorm", layer)
        xa = self.align(name + ".in", x, s)
        p = make_layernorm_params(
            np.asarray(ln.gamma, np.float64),
            np.asarray(ln.beta, np.float64),
            float(ln.eps),
            out_bits=s.layernorm_out_bits,
        )
        self.count(name + ".gamma", ln.gamma.size, 16, 0, None)
        self.count(name + ".beta", ln.beta.size, 16, 0, None)
        y = self.add(
            ir.Nonlinear(
                name=name + ".y",
                inputs=(xa,),
                kind="layernorm",
                method="isqrt",
                params=p,
                e_in=0,
                e_out=int(p.e_out),
                out_fmt=_fixed_fmt(s.layernorm_out_bits, s),
            )
        )
        return self.requant(name, y, s, point, 3, ln.names.get(S.ROLE_OUT))

    def residual(self, name: str, a: str, b: str, layer: int | None, point: str, onnx: str | None = None) -> str:
        s = self.cfg.settings("residual", layer)
        fmt = _act_fmt(s, s.residual_bits)
        return self.add(
            ir.Add(name=name, inputs=(a, b), onnx_name=onnx, fmt=fmt, exp=self.static_exp(point, fmt, s, 3))
        )

    # -- model --------------------------------------------------------------------------
    def embeddings(self) -> str:
        e = self.spec.embeddings
        s = self.cfg.settings("embedding")
        word = self.add(
            ir.Embed(
                name="emb.word", inputs=("input_ids",), table=self.quant_weight(e.word, s, axis=-1, what="emb.word")
            )
        )
        pos = self.add(
            ir.Embed(
                name="emb.position",
                inputs=("position_ids",),
                table=self.quant_weight(e.position, s, axis=-1, what="emb.position"),
            )
        )
        total = self.residual("emb.sum_wp", word, pos, None, "emb.sum_wp")
        if e.token_type is not None:
            tt = self.add(
                ir.Embed(
                    name="emb.token_type",
                    inputs=("token_type_ids",),
                    table=self.quant_weight(e.token_type, s, axis=-1, what="emb.token_type"),
                )
            )
            total = self.residual("emb.sum", total, tt, None, "emb.sum", e.names.get(S.ROLE_OUT))
        return self.layernorm("emb.ln", total, e.layer_norm, None, "emb.ln")

    def attention(self, i: int, x: str, at: S.Attention) -> str:
        p = f"L{i}."
        cfg = self.cfg
        hidden = at.q.out_features
        if hidden % at.num_heads:
            raise LoweringError(f"layer {i}: hidden {hidden} not divisible by {at.num_heads} heads")
        sq, sk, sv = (cfg.settings(c, i) for c in ("query", "key", "value"))
        xa = self.align(p + "x.aligned", x, sq)
        outs = {}
        for role, lin, s in (("q", at.q, sq), ("k", at.k, sk), ("v", at.v, sv)):
            acc = self.linear(p + role + ".acc", xa, lin, s)
            outs[role] = self.requant(p + role, acc, s, p + role, 3, lin.names.get(S.ROLE_OUT))
        s_sc = cfg.settings("scores", i)
        qa = self.align(p + "q.aligned", outs["q"], s_sc, axes=(-1,))
        ka = self.align(p + "k.aligned", outs["k"], s_sc, axes=(1, 2))
        va = self.align(p + "v.aligned", outs["v"], cfg.settings("context", i), axes=(1, 2))
        qh = self.add(ir.SplitHeads(name=p + "q.heads", inputs=(qa,), num_heads=at.num_heads))
        kh = self.add(ir.SplitHeads(name=p + "k.heads", inputs=(ka,), num_heads=at.num_heads, transpose=True))
        vh = self.add(ir.SplitHeads(name=p + "v.heads", inputs=(va,), num_heads=at.num_heads))
        s_acc = self.add(
            ir.MatMul(
                name=p + "scores.acc", inputs=(qh, kh), acc_bits=s_sc.acc_bits, acc_saturation=s_sc.acc_saturation_mode
            )
        )
        ssm = cfg.settings("softmax", i)
        # scores at a fixed 2**-9 resolution; in_bits sets the range (18 bits: [-256, 256))
        e_sm = -9
        mult, shift = quantize_multiplier(float(at.scale))
        scores = self.add(
            ir.Rescale(
                name=p + "scores",
                inputs=(s_acc,),
                multiplier=mult,
                shift=shift,
                e_out=e_sm,
                fmt=_fixed_fmt(ssm.softmax_in_bits, ssm),
            )
        )
        if not any(isinstance(n, ir.Mask) for n in self.nodes):
            lo = -(1 << (ssm.softmax_in_bits - 1))
            mv = max(lo, int(np.round(float(at.mask_value) / 2.0**e_sm))) if np.isfinite(at.mask_value) else lo
            self.add(ir.Mask(name="mask", inputs=("attention_mask",), value=mv, e_out=e_sm, bits=ssm.softmax_in_bits))
        sp = make_softmax_params(
            e_in=e_sm,
            in_bits=ssm.softmax_in_bits,
            out_bits=ssm.softmax_out_bits,
            method=ssm.softmax_method,
            lut_addr_bits=ssm.softmax_lut_addr_bits,
        )
        probs = self.add(
            ir.Nonlinear(
                name=p + "probs",
                inputs=(scores, "mask"),
                onnx_name=at.names.get(S.ROLE_PROBS),
                kind="softmax",
                method=ssm.softmax_method,
                params=sp,
                e_in=e_sm,
                e_out=int(sp.e_out),
                out_fmt=_fixed_fmt(ssm.softmax_out_bits, ssm, signed=False),
            )
        )
        sc = cfg.settings("context", i)
        c_acc = self.add(
            ir.MatMul(
                name=p + "context.acc", inputs=(probs, vh), acc_bits=sc.acc_bits, acc_saturation=sc.acc_saturation_mode
            )
        )
        c_m = self.add(ir.MergeHeads(name=p + "context.merged", inputs=(c_acc,)))
        ctx = self.requant(p + "context", c_m, sc, p + "context", 3, at.names.get(S.ROLE_CONTEXT))
        so = cfg.settings("attention_output", i)
        ca = self.align(p + "context.aligned", ctx, so)
        o_acc = self.linear(p + "attn_out.acc", ca, at.out, so)
        return self.requant(p + "attn_out", o_acc, so, p + "attn_out", 3, at.out.names.get(S.ROLE_OUT))

    def ffn(self, i: int, h: str, layer: S.EncoderLayer) -> str:
        p = f"L{i}."
        si = self.cfg.settings("intermediate", i)
        ha = self.align(p + "h.aligned", h, si)
        f_acc = self.linear(p + "ffn1.acc", ha, layer.intermediate, si)
        sg = self.cfg.settings("gelu", i)
        amax = self.calib.get(p + "ffn1") if self.calib is not None else None
        # GELU input: calibrated range when known, else +-64 (far beyond where GELU(x) = x or 0).
        rng = float(np.max(amax)) if amax is not None and sg.scaling == "static" else 64.0
        e_g = _fixed_exp_for_range(sg.gelu_in_bits, max(rng, 1e-3))
        g_in = self.add(
            ir.Requant(
                name=p + "ffn1",
                inputs=(f_acc,),
                onnx_name=layer.intermediate.names.get(S.ROLE_OUT),
                fmt=_fixed_fmt(sg.gelu_in_bits, sg),
                exp=np.array([[[e_g]]], dtype=np.int32),
            )
        )
        approximate = "tanh" if layer.activation == "gelu_tanh" else "none"
        if sg.gelu_method == "poly":
            if approximate == "tanh":
                raise LoweringError(
                    f"layer {i}: gelu_method='poly' implements the erf form; this model uses the tanh "
                    "approximation: set gelu_method='lut'"
                )
            gp = make_gelu_poly(e_in=e_g, in_bits=sg.gelu_in_bits, out_bits=sg.gelu_out_bits)
        else:
            gp = make_gelu_lut(
                e_in=e_g,
                in_bits=sg.gelu_in_bits,
                addr_bits=sg.gelu_lut_addr_bits,
                out_bits=sg.gelu_out_bits,
                approximate=approximate,
            )
        g = self.add(
            ir.Nonlinear(
                name=p + "gelu.y",
                inputs=(g_in,),
                kind="gelu",
                method=sg.gelu_method,
                params=gp,
                e_in=e_g,
                e_out=int(gp.e_out),
                out_fmt=_fixed_fmt(sg.gelu_out_bits, sg),
            )
        )
        so = self.cfg.settings("output", i)
        gq = self.requant(p + "gelu", g, so, p + "gelu", 3, layer.names.get(S.ROLE_OUT))
        ga = self.align(p + "gelu.aligned", gq, so)
        o_acc = self.linear(p + "ffn2.acc", ga, layer.output, so)
        return self.requant(p + "ffn2", o_acc, so, p + "ffn2", 3, layer.output.names.get(S.ROLE_OUT))

    def head(self, x: str) -> dict[str, str]:
        outs = {"last_hidden_state": x}
        sp = self.spec
        if sp.pooler is None:
            return outs
        s = self.cfg.settings("pooler")
        cls = self.add(ir.TakeCls(name="pooler.cls", inputs=(x,)))
        ca = self.align("pooler.cls.aligned", cls, s)
        p_acc = self.linear("pooler.acc", ca, sp.pooler, s)
        st = self.cfg.settings("tanh")
        e_t = 3 - (st.tanh_in_bits - 1)  # +-8: tanh is +-1 to 1e-6 beyond
        t_in = self.add(
            ir.Requant(
                name="pooler.dense",
                inputs=(p_acc,),
                onnx_name=sp.pooler.names.get(S.ROLE_OUT),
                fmt=_fixed_fmt(st.tanh_in_bits, st),
                exp=np.array([[e_t]], dtype=np.int32),
            )
        )
        tp = make_tanh_lut(
            e_in=e_t, in_bits=st.tanh_in_bits, addr_bits=st.tanh_lut_addr_bits, out_bits=st.tanh_out_bits
        )
        t = self.add(
            ir.Nonlinear(
                name="pooler",
                inputs=(t_in,),
                onnx_name=sp.names.get("pooler_tanh"),
                kind="tanh",
                method=st.tanh_method,
                params=tp,
                e_in=e_t,
                e_out=int(tp.e_out),
                out_fmt=_fixed_fmt(st.tanh_out_bits, st),
            )
        )
        outs["pooler_output"] = t
        if sp.classifier is None:
            return outs
        sc = self.cfg.settings("classifier")
        ta = self.align("pooler.aligned", t, sc, guard=0)
        l_acc = self.linear("classifier.acc", ta, sp.classifier, sc)
        logits_name = next((n for n, r in sp.outputs.items() if r == "logits"), None)
        logits = self.add(
            ir.Requant(
                name="logits", inputs=(l_acc,), onnx_name=logits_name, fmt=_fixed_fmt(sc.output_bits, sc), exp=None
            )
        )
        outs["logits"] = logits
        return outs

    def run(self) -> ir.Graph:
        x = self.embeddings()
        for i, layer in enumerate(self.spec.layers):
            a = self.attention(i, x, layer.attention)
            h = self.layernorm(
                f"L{i}.ln1", self.residual(f"L{i}.res1", x, a, i, f"L{i}.res1"), layer.attention_norm, i, f"L{i}.ln1"
            )
            f = self.ffn(i, h, layer)
            x = self.layernorm(
                f"L{i}.ln2", self.residual(f"L{i}.res2", h, f, i, f"L{i}.res2"), layer.output_norm, i, f"L{i}.ln2"
            )
        outs = self.head(x)
        return ir.Graph(
            nodes=tuple(self.nodes),
            outputs=outs,
            config_name=self.cfg.name,
            info={
                "storage": self.storage,
                "dynamic_fallback": self.fallbacks,
                "position_offset": self.spec.embeddings.position_offset,
                "max_positions": int(self.spec.embeddings.position.shape[0]),
                "vocab_size": self.spec.vocab_size,
                "type_vocab_size": 0
                if self.spec.embeddings.token_type is None
                else int(self.spec.embeddings.token_type.shape[0]),
            },
        )


def lower(spec: S.BertSpec, config: Config, calib: Calibration | None = None) -> ir.Graph:
    """Lower ``spec`` to the integer IR under ``config`` (static points need ``calib``)."""
    return _Lowerer(spec, config, calib).run()


def compression(graph: ir.Graph) -> dict[str, float]:
    """fp32 bytes / integer bytes, block scales included.

    ``weight_compression`` counts the matmul weights and embedding tables (the BBCT claim);
    ``model_compression`` adds biases and LayerNorm parameters at their stored widths.
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
