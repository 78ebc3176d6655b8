"""Vector dumps: every file reads back to the traced integers at the width and signedness the
manifest states, constants once, the wide weight rebuilt from ``stored`` by the documented
rule, provenance and inputs in the manifest, overflow counts per node, and the parameter
export (JSON, and a SystemVerilog package that Icarus compiles and imports)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from bert_exports import tiny_inputs

from bbct.golden.params import params_json, params_sv, sv_literal, sv_name, tensor_ports
from bbct.golden.vectors import dump_vectors, to_hex_lines
from bbct.kernels.formats import EXP_ZERO
from bbct.simulator import ir
from bbct.simulator.cli import main
from bbct.simulator.config import load_config
from bbct.simulator.execute import HANDLERS, graph_inputs, run
from bbct.simulator.frontend.onnx_in import load_graph
from bbct.simulator.lower import lower


@pytest.fixture(scope="module")
def spec(tiny_bert_onnx):
    return load_graph(tiny_bert_onnx)


def read_hex(path: Path, bits: int, signed: bool) -> list[int]:
    """An independent reader: hex lines of ``bits`` width, sign-extended when ``signed``."""
    out = []
    for line in path.read_text().split():
        assert len(line) == max(1, -(-bits // 4)), (path.name, line)
        v = int(line, 16)
        assert v < 1 << bits, (path.name, line)
        out.append(v - (1 << bits) if signed and v >> (bits - 1) else v)
    return out


def _traced(g, feeds):
    res = run(g, feeds, trace=True)
    return res, {**graph_inputs(g, feeds), **res.tensors}


def test_hex_is_twos_complement_or_unsigned_at_the_port_width():
    # -1 at 12 bits is fff; 5 at 1 bit would not fit, but 1 is "1"; 255 unsigned 8 bits is ff
    assert to_hex_lines(np.array([-1, 0, 2047, -2048]), 12) == "fff\n000\n7ff\n800\n"
    assert to_hex_lines(np.array([255, 0]), 8) == "ff\n00\n" and to_hex_lines(np.array([1, 0]), 1) == "1\n0\n"
    assert to_hex_lines(np.array([-(1 << 61)]), 62) == "2000000000000000\n"


def test_every_file_reads_back_at_its_stated_width(spec, tmp_path):
    g = lower(spec, load_config("w8a8"))
    feeds = tiny_inputs()
    res, tensors = _traced(g, feeds)
    path = dump_vectors(g, tensors, tmp_path / "v", overflow=res.overflow)
    m = json.loads(path.read_text())
    for f in m["files"]:
        vals = read_hex(tmp_path / "v" / f["file"], f["bits"], f["signed"])
        assert len(vals) == int(np.prod(f["shape"])), f["file"]
        if f.get("constant") or "flags" in f:
            continue
        q = tensors[f["tensor"]]
        want = np.asarray(q.exp) if f["port"].endswith(".exp") else q.data
        assert vals == np.asarray(want).ravel().tolist(), f["file"]
    by = {(f["node"], f["port"]): f for f in m["files"]}
    cfg = load_config("w8a8").default
    # widths from the format, not the data: aligned = act_bits + act_guard, accumulators acc_bits,
    # softmax probabilities unsigned softmax_out_bits, exponents 16 bits, the float mask 1-bit flags
    assert (by["L0.q.acc", "in0"]["bits"], by["L0.q.acc", "in0"]["signed"]) == (cfg.act_bits + cfg.act_guard, True)
    assert (by["L0.q.acc", "out"]["bits"], by["L0.probs", "out"]["bits"]) == (cfg.acc_bits, cfg.softmax_out_bits)
    assert by["L0.probs", "out"]["signed"] is False and "unsigned" in by["L0.probs", "out"]["encoding"]
    assert all(f["bits"] == 16 and f["signed"] for f in m["files"] if f["port"].endswith(".exp"))
    assert (by["mask", "in0"]["bits"], by["mask", "in0"]["signed"]) == (1, False)
    # constants: stored codes at weight_bits, the wide weight at weight_bits + guard, (K, N) stated
    assert by["L0.q.acc", "stored"]["bits"] == cfg.weight_bits
    assert by["L0.q.acc", "weight"]["bits"] == cfg.weight_bits + cfg.weight_guard
    assert by["L0.q.acc", "weight"]["layout"].startswith("(K, N)")
    beta = {f["bits"] for f in m["files"] if f["port"] == "params.beta"}
    assert beta == {cfg.layernorm_out_bits}  # every LayerNorm's beta at its port width, not its data's


def test_mult_scaled_weights_state_their_multipliers(spec, tmp_path):
    cfg = load_config({"preset": "w8a8", "default": {"weight_scale": "mult", "weight_mant_bits": 4}})
    g = lower(spec, cfg)
    res, tensors = _traced(g, tiny_inputs())
    path = dump_vectors(g, tensors, tmp_path / "v", ["L0.q.acc", "emb.word"])
    m = json.loads(path.read_text())
    by = {(f["node"], f["port"]): f for f in m["files"]}
    for f in m["files"]:  # every value fits the stated width (the dump itself refuses otherwise)
        assert len(read_hex(tmp_path / "v" / f["file"], f["bits"], f["signed"])) == int(np.prod(f["shape"]))
    assert (by["L0.q.acc", "stored.mant"]["bits"], by["L0.q.acc", "stored.mant"]["signed"]) == (4, False)
    assert by["L0.q.acc", "weight"]["bits"] == 8 + 4 + 12
    mant = read_hex(tmp_path / "v" / by["emb.word", "out.mant"]["file"], 4, False)
    assert mant == np.asarray(tensors["emb.word"].mant).ravel().tolist() and min(mant) >= 8


def test_rebuild_the_wide_weight_from_stored(spec):
    """The manifest's rule, implemented here in Python ints from KERNELS.md alone, gives the
    weight the linear multiplies by, for every linear (all-zero blocks included)."""
    g = lower(spec, load_config({"preset": "w8a8", "default": {"weight_guard": 5}}))
    linears = [n for n in g.nodes if isinstance(n, ir.Linear)]
    assert linears
    for n in linears:
        rec = params_json(g)[n.name]
        guard = rec["params"]["weight_guard"]
        assert guard == 5
        q, e = n.stored.data.astype(np.int64), np.asarray(n.stored.exp)
        bs = n.stored.fmt.block_size or q.shape[0]
        e_ref = int(e[e != EXP_ZERO].max()) - guard
        assert e_ref == n.w_exp
        wide = np.zeros_like(q)
        for k in range(q.shape[0]):
            for j in range(q.shape[1]):
                eb = int(e[k // bs, j])
                if eb == EXP_ZERO:
                    continue
                s, v = e_ref - eb, int(q[k, j])
                if s <= 0:
                    wide[k, j] = v << -s
                else:  # round half to even
                    fl, rem = v >> s, v & ((1 << s) - 1)
                    half = 1 << (s - 1)
                    wide[k, j] = fl + (rem > half or (rem == half and fl & 1))
        assert np.array_equal(wide, n.weight), n.name


def test_weight_rebuild_hand_golden():
    # KERNELS.md, linear: a (2, 2) weight in blocks of 1 along K, exponents -3 and -20 in column
    # 0, guard 12: w_exp = -3 - 12 = -15; 5 at -3 is 5 << 12 = 20480; 5 at -20 is
    # 5 >>RND_CONV 5 = 0.156 -> 0; column 1: 7 at -3 -> 28672, and an all-zero block gives 0
    from bbct.kernels.align import align
    from bbct.kernels.formats import IntFormat, QTensor, Rounding

    fmt = IntFormat(bits=8, block_axis=0, block_size=1)
    stored = QTensor(np.array([[5, 7], [5, 0]], np.int8), fmt, np.array([[-3, -3], [-20, EXP_ZERO]], np.int32))
    wide, e = align(stored, reduce_axes=(0, 1), guard=12, rounding=Rounding.RND_CONV)
    assert int(np.asarray(e).ravel()[0]) == -15 and wide.tolist() == [[20480, 28672], [0, 0]]


def test_constants_once_and_stimulus_per_input(capsys, tiny_bert_onnx, tmp_path):
    out = tmp_path / "once"
    texts = ["w5 w6 w7", "w8"]
    argv = ["vectors", str(tiny_bert_onnx), "--out", str(out), "--constants", "once", "--nodes", "L0.*"]
    assert main(argv + [a for t in texts for a in ("--text", t)]) == 0
    m = json.loads((out / "vectors.json").read_text())
    assert m["constants"] == "once" and [i["folder"] for i in m["inputs"]] == ["input0", "input1"]
    assert [i["texts"] for i in m["inputs"]] == [[t] for t in texts]
    const = [f for f in m["files"] if f.get("constant")]
    assert const and all(f["file"].startswith("constants/") for f in const)
    assert not [f for f in const if f["port"] == "weight"] and "linear.weight" in m["rebuild"]
    assert {f["port"] for f in const} >= {"stored", "stored.exp", "bias"}
    # each input's stimulus is that text simulated alone, with its own token ids
    from bbct.simulator.session import Simulator

    sim = Simulator(tiny_bert_onnx, "w8a8")
    for i, t in enumerate(texts):
        feeds = sim.encode([t])
        assert m["inputs"][i]["input_ids"] == feeds["input_ids"].tolist()
        res = sim.run(feeds, trace=True)
        f = next(f for f in m["files"] if f["file"] == f"input{i}/L0.probs.out.hex")
        assert read_hex(out / f["file"], f["bits"], f["signed"]) == res.tensors["L0.probs"].data.ravel().tolist()
    # per-input: one folder, all texts one batch, the wide weight included
    per = tmp_path / "per"
    assert main(["vectors", str(tiny_bert_onnx), "--out", str(per), "--nodes", "L0.*", "--text", texts[0]]) == 0
    mp = json.loads((per / "vectors.json").read_text())
    assert any(f["port"] == "weight" for f in mp["files"]) and "/" not in "".join(f["file"] for f in mp["files"])


def test_manifest_carries_config_provenance_and_overflow(capsys, tiny_bert_onnx, tmp_path):
    toml = tmp_path / "narrow.toml"
    toml.write_text('preset = "w8a8"\n[default]\nacc_bits = 12\n')
    out = tmp_path / "v"
    argv = ["vectors", str(tiny_bert_onnx), "--text", "w5 w6 w7 w8", "--out", str(out), "--config", str(toml)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "vectors.json").read_text())
    assert m["config"] == load_config(toml).to_dict() and m["config"]["default"]["acc_bits"] == 12
    prov = m["provenance"]
    assert prov["model_sha256"] == hashlib.sha256(Path(tiny_bert_onnx).read_bytes()).hexdigest()
    assert prov["bbct_version"] and "created_utc" not in prov
    assert m["inputs"][0]["texts"] == ["w5 w6 w7 w8"] and m["inputs"][0]["input_ids"][0][0] == 2
    # overflow per node equals the executor's count for the same batch, and the total is printed
    from bbct.simulator.session import Simulator

    sim = Simulator(tiny_bert_onnx, load_config(toml))
    res = sim.run(sim.encode(["w5 w6 w7 w8"]))
    got = {e["node"]: e["overflow"][0] for e in m["nodes"] if e["overflow_total"]}
    assert got == res.overflow and sum(got.values()) > 0
    assert f"overflow/saturation events: {sum(got.values())}" in printed
    # docs/KERNELS.md, "Vector manifest", names every field a dump writes
    doc = (Path(__file__).resolve().parents[1] / "docs" / "KERNELS.md").read_text()
    doc = doc[doc.index("## Vector manifest") :]
    keys = set(m) | {k for part in ("files", "nodes", "inputs") for row in m[part] for k in row}
    assert not sorted(k for k in keys if f"`{k}`" not in doc)
    # two dumps of the same model, config and text are byte-identical, manifest included
    again = tmp_path / "v2"
    assert main(argv[:5] + [str(again)] + argv[6:]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in again.iterdir())
    for p in out.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def test_every_ir_op_has_a_port_rule(spec):
    from bbct.golden.params import PORTS

    assert set(HANDLERS) == set(PORTS)
    ports = tensor_ports(lower(spec, load_config("w8a8")))
    assert ports["L0.probs"].signed is False


def test_params_json_and_sv_names(spec):
    g = lower(spec, load_config("w8a8"))
    recs = params_json(g)
    assert list(recs) == [n.name for n in g.nodes]
    r = recs["L0.q.acc"]
    assert r["params"]["acc_bits"] == 42 and r["params"]["weight_guard"] == 12
    lo, hi = r["params"]["stored.exp_range"]  # within the 8-bit exponent window below emax
    assert hi - lo < 1 << 8 and hi - 12 == r["params"]["w_exp"]
    assert r["constants"]["weight"]["layout"].startswith("(K, N)")
    gelu = next(v for v in recs.values() if v["op"] == "gelu")
    sm = recs["L0.probs"]
    assert sm["ports"]["out"] == {"tensor": "L0.probs", "bits": 8, "signed": False}
    lut = gelu["params"]["params"]  # the tiny model's GELU is the tanh form: a table
    assert gelu["constants"]["params.table"]["lut_depth"] == (1 << lut["addr_bits"]) + lut["interp"]
    assert sv_name("L0.q.acc", "acc_bits") == "L0_Q_ACC_ACC_BITS" and sv_name("0x", "y") == "N_0X_Y"
    sv = params_sv(g)
    assert "localparam int L0_Q_ACC_ACC_BITS = 42;" in sv and "localparam int L0_PROBS_OUT_SIGNED = 0;" in sv


@pytest.mark.skipif(shutil.which("iverilog") is None, reason="iverilog is not installed (CI installs it)")
def test_sv_package_compiles_and_imports(spec, tmp_path):
    """Icarus compiles the package and a top that imports it; the values it prints are the
    graph's, and a value beyond 32 bits keeps its 64-bit literal."""
    g = lower(spec, load_config({"preset": "w8a8", "op": {"softmax": {"softmax_method": "lut"}}}))
    (tmp_path / "bbct_params.sv").write_text(params_sv(g))
    sm = next(n for n in g.nodes if isinstance(n, ir.Softmax))
    name = sv_name(sm.name, "params_l2e_q")
    typ, big = sv_literal(-(1 << 40) - 3)
    (tmp_path / "top.sv").write_text(
        f"module top;\n  import bbct_params::*;\n  localparam {typ} BIG = {big};\n"
        f'  initial $display("%0d %0d %0d %0d", L0_Q_ACC_ACC_BITS, {sv_name(sm.name, "out_bits")}, {name}, BIG);\n'
        "endmodule\n"
    )
    sources = [str(tmp_path / "bbct_params.sv"), str(tmp_path / "top.sv")]
    subprocess.run(
        ["iverilog", "-g2012", "-o", str(tmp_path / "a.out"), *sources],
        check=True,
        capture_output=True,
        timeout=120,
    )
    p = subprocess.run(["vvp", "-n", str(tmp_path / "a.out")], capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.split() == ["42", "8", str(sm.params.l2e_q), str(-(1 << 40) - 3)]
