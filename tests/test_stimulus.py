"""Kernel stimulus: corner coverage measured from the values, expected outputs equal to the
reference twins, files a testbench reads, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbct.golden import stimulus as S
from bbct.kernels.formats import IntFormat, QTensor, Rounding, Saturation
from bbct.simulator.cli import main


@pytest.fixture(scope="module")
def corner() -> dict[str, S.Stimulus]:
    return {k: S.generate(k, "corner", 0, 0) for k in S.KERNELS}


@pytest.mark.parametrize("kernel", sorted(S.KERNELS))
def test_corner_stimulus_hits_every_bin(corner, kernel):
    st = corner[kernel]
    missed = [b for b, n in st.coverage.items() if n == 0]
    assert not missed, f"{kernel}: corner stimulus misses {missed}"
    assert len(st.coverage) == len(S.KERNELS[kernel].bins) >= 6


def test_every_kernel_of_the_issue_has_stimulus():
    assert {"requantize", "gemm", "align", "add", "softmax", "layernorm", "gelu"} <= set(S.KERNELS)


def _rq(x, shift, rnd, sat=Saturation.SAT):
    c = S._rq_case(x, shift, rnd, sat)
    return S._rq_inspect({**c, **S._rq_expect(c)})


def test_inspection_reads_the_values_hand_golden():
    # 20 >> 3 is 2.5: a tie with an even floor (2); under RND_CONV it stays 2, RND gives 3
    assert _rq(20, 3, Rounding.RND_CONV) == {"shift.tie.RND_CONV.pos.even": 1}
    assert S._rq_expect(S._rq_case(20, 3, Rounding.RND_CONV, 0))["y"] == [2]
    assert S._rq_expect(S._rq_case(20, 3, Rounding.RND, 0))["y"] == [3]
    # -20 >> 3 is -2.5: floor -3 is odd
    assert _rq(-20, 3, Rounding.RND_INF) == {"shift.tie.RND_INF.neg.odd": 1}
    # one more or less is no tie at all
    assert _rq(21, 3, Rounding.RND_CONV) == {} and _rq(19, 3, Rounding.RND_CONV) == {}
    # 128 >> 0 does not fit s8: the SAT clip at the upper bound; -128 only SAT_SYM refuses
    assert _rq(128, 0, Rounding.TRN) == {"out.sat.SAT.hi": 1}
    assert _rq(-128, 0, Rounding.TRN, Saturation.SAT) == {"out.exact_bound": 1}
    sym = {"out.sat.SAT_SYM.lo": 1, "out.sat_sym_refuses_min_code": 1}
    assert _rq(-128, 0, Rounding.TRN, Saturation.SAT_SYM) == sym
    # a right shift of 70 is taken as 62; 1 << 61 is then exactly half
    assert _rq(1 << 61, 70, Rounding.RND) == {"shift.right_beyond_62": 1, "shift.tie.RND.pos.even": 1}


def test_a_corner_case_changed_by_one_code_loses_its_bins():
    k = S.KERNELS["gemm"]
    tie = next(c for c in k.corner(np.random.default_rng(0)) if c["bias_en"][0] and c["guard"][0] == 0)
    hits = k.inspect({**tie, **k.expect(tie)})
    assert any(b.startswith("align.tie.") for b in hits) and any(b.startswith("bias.tie.") for b in hits)
    moved = {**tie, "a": [v + 1 if i == 4 else v for i, v in enumerate(tie["a"])], "bias": [tie["bias"][0] + 1]}
    hits = k.inspect({**moved, **k.expect(moved)})
    assert not any(".tie." in b for b in hits), hits


def test_random_stimulus_flags_the_bins_it_misses():
    st = S.generate("requantize", "random", 40, 5)
    table = S.coverage_table(st)
    missed = [b for b, n in st.coverage.items() if n == 0]
    assert missed and all(f"{b} " in table for b in missed)
    assert table.count("<-- not hit") == len(missed) and f"{len(missed)} NOT HIT" in table


def _reference_outputs(kernel: str, c: S.Case) -> S.Case:
    """The expected outputs again, from the plain-Python twins of the kernels."""
    from bbct.kernels.add import add_ref
    from bbct.kernels.align import align_ref
    from bbct.kernels.gelu import gelu_poly_ref
    from bbct.kernels.gemm import gemm_ref
    from bbct.kernels.layernorm import layernorm_ref
    from bbct.kernels.requantize import requantize_ref
    from bbct.kernels.softmax import softmax_ref

    def aligned(codes, exps, guard, rnd, axis):
        fmt = IntFormat(bits=8, block_axis=axis, block_size=S.DOT_BS)
        shape, eshape = ((1, S.DOT_K), (1, S.DOT_NB)) if axis == -1 else ((S.DOT_K, 1), (S.DOT_NB, 1))
        q = QTensor(np.array(codes, np.int8).reshape(shape), fmt, np.array(exps, np.int32).reshape(eshape))
        return align_ref(q, (axis,), guard, Rounding(rnd))

    if kernel == "requantize":
        fmt = IntFormat(bits=S.RQ_OUT, block_size=1, rounding=c["rnd"][0], saturation=c["sat"][0])
        q = requantize_ref(np.array(c["x"]), np.zeros(1, np.int32), fmt, np.array(c["shift"]))
        return {"y": [int(q.data[0])], "ovf": [q.meta["overflow"]]}
    if kernel == "requantize_dynamic":
        fmt = IntFormat(bits=8, block_size=S.DOT_BS, rounding=c["rnd"][0], saturation=c["sat"][0])
        q = requantize_ref(np.array(c["x"]).reshape(1, -1), np.array([c["e_in"]]), fmt)
        return {"y": q.data.ravel().tolist(), "e_out": np.ravel(q.exp).tolist(), "ovf": [q.meta["overflow"]]}
    if kernel == "align":
        w, e = aligned(c["q"], c["e"], c["guard"][0], c["rnd"][0], -1)
        return {"wide": w.ravel().tolist(), "e_ref": [int(e.ravel()[0])]}
    if kernel == "gemm":
        wa, ea = aligned(c["a"], c["ea"], c["guard"][0], c["align_rnd"][0], -1)
        wb, eb = aligned(c["b"], c["eb"], c["guard"][0], c["align_rnd"][0], 0)
        bias = np.array(c["bias"]) if c["bias_en"][0] else None
        acc, e_acc, n = gemm_ref(
            wa,
            ea,
            wb,
            eb.reshape(1, 1),
            c["acc_bits"][0],
            Saturation(c["acc_sat"][0]),
            bias,
            c["e_bias"][0],
            Rounding(c["bias_rnd"][0]),
        )
        return {"acc": [int(acc[0, 0])], "e_acc": [int(e_acc[0, 0])], "events": [n]}
    if kernel == "add":
        e_out = np.array(c["exp_out"]).reshape(1, -1) if c["static"][0] else None
        y = add_ref(S._add_qt(c["a"], c["ea"]), S._add_qt(c["b"], c["eb"]), S._add_out_fmt(c), e_out)
        return {"y": y.data.ravel().tolist(), "ey": np.ravel(y.exp).tolist(), "ovf": [y.meta["overflow"]]}
    if kernel == "softmax":
        m = np.array(c["mask"]).reshape(1, -1) * S.SM_MASK_ADD
        return {"y": softmax_ref(np.array(c["x"]).reshape(1, -1), m, S._sm_params()).ravel().tolist()}
    if kernel == "gelu":
        return {"y": gelu_poly_ref(np.array(c["x"]), S._gelu_params()).tolist()}
    if kernel == "layernorm":
        y, e = layernorm_ref(np.array(c["x"]).reshape(1, -1), np.array([[c["e_row"][0]]]), S._ln_params())
        return {"y": y.ravel().tolist()}
    raise AssertionError(f"no reference for {kernel}")


@pytest.mark.parametrize("kernel", sorted(S.KERNELS))
def test_expected_outputs_equal_the_reference_twins(corner, kernel):
    ports = [p.name for p in S.KERNELS[kernel].ports if p.direction == "out"]
    for c in corner[kernel].cases:
        ref = _reference_outputs(kernel, c)
        assert {p: [int(v) for v in ref[p]] for p in ports} == {p: c[p] for p in ports}, c


def test_files_are_hex_at_the_port_width_and_reproducible(tmp_path):
    st = S.generate("gemm", "corner", 200, 3)
    path = S.write_stimulus(st, tmp_path / "a")
    doc = json.loads(path.read_text())
    assert doc["kernel"] == "gemm" and doc["count"] == 200 and doc["coverage"] == st.coverage
    for p in doc["ports"]:
        lines = (tmp_path / "a" / p["file"]).read_text().split("\n")[:-1]
        assert len(lines) == 200 * p["lanes"] and {len(s) for s in lines} == {-(-p["bits"] // 4)}
        vals = [int(s, 16) for s in lines]
        if p["signed"]:
            vals = [v - (1 << p["bits"]) if v >> (p["bits"] - 1) else v for v in vals]
        port = next(q for q in st.ports if q.name == p["name"])
        assert vals == st.column(port).ravel().tolist()
    assert (tmp_path / "a" / "ea.hex").read_text().startswith("0000\n")  # exponent 0 of block 0
    assert "fc00" in (tmp_path / "a" / "ea.hex").read_text()  # EXP_ZERO = -1024 at 16 bits
    S.write_stimulus(S.generate("gemm", "corner", 200, 3), tmp_path / "b")
    S.write_stimulus(S.generate("gemm", "corner", 200, 4), tmp_path / "c")
    same = (tmp_path / "a" / "a.hex").read_bytes() == (tmp_path / "b" / "a.hex").read_bytes()
    assert same and (tmp_path / "a" / "a.hex").read_bytes() != (tmp_path / "c" / "a.hex").read_bytes()


def test_cli_kernel_vectors(capsys, tmp_path):
    assert main(["vectors", "--kernel", "requantize", "--stimulus", "corner", "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "36 of 36 bins hit" in out and "shift.tie.RND_CONV.neg.odd" in out
    assert json.loads((tmp_path / "v" / "stimulus.json").read_text())["stimulus"] == "corner"
    assert main(["vectors", "--kernel", "gelu", "--stimulus", "random", "--count", "5", "--out", str(tmp_path)]) == 0
    assert "NOT HIT" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vectors", "--out", "X"], "give --text SENTENCE"),
        (["vectors", "--kernel", "gelu", "--stimulus", "random", "--out", "X"], "--count 0"),
        (["vectors", "--kernel", "gelu", "--count", "-1", "--out", "X"], "--count -1"),
        (["testbench", "--kernel", "gelu", "--rtl", "no.sv", "--top", "t", "--vectors", "X", "--out", "Y"], "no.sv"),
        (["testbench", "--rtl", "R", "--top", "t", "--vectors", "X", "--out", "Y"], "exactly one of"),
        (["testbench", "--kernel", "gemm", "--rtl", "R", "--top", "t", "--vectors", "V", "--out", "Y"], "gelu"),
        (
            [
                "testbench",
                "--kernel",
                "gelu",
                "--rtl",
                "R",
                "--top",
                "t",
                "--vectors",
                "V",
                "--out",
                "Y",
                "--param",
                "W",
            ],
            "NAME=INTEGER",
        ),
        (["testbench", "--node", "L9.x", "--rtl", "R", "--top", "t", "--vectors", "V", "--out", "Y"], "vectors.json"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "R").write_text("module t; endmodule\n")
    S.write_stimulus(S.generate("gelu", "corner", 0, 0), tmp_path / "V")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bbct: error: ") and err.count("\n") == 1 and message in err, err


def test_layernorm_inspection_steps_reproduce_the_kernel():
    """The coverage of layernorm reads the spec's steps, recomputed with math.isqrt; on random
    rows they give the kernel's outputs, so the bins look at the values the kernel shifts."""
    from bbct.kernels.formats import saturate_ref, shift_round_ref

    rng, p = np.random.default_rng(1), S._ln_params()
    for _ in range(200):
        c = S._ln_random(rng)
        steps = S._ln_steps(c["x"], c["e_row"][0])
        y = [
            saturate_ref(shift_round_ref(n * int(g), steps["y_shift"], Rounding.RND) + int(b), S.LN_OUT, True, 0)[0]
            for n, g, b in zip(steps["n"], p.gamma, p.beta, strict=True)
        ]
        assert y == S._ln_expect(c)["y"], c


def test_a_used_folder_keeps_only_the_new_set(tmp_path):
    S.write_stimulus(S.generate("gemm", "corner", 0, 0), tmp_path)
    S.write_stimulus(S.generate("gelu", "corner", 0, 0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stimulus.json", "x.hex", "y.hex"]
    doc = json.loads((tmp_path / "stimulus.json").read_text())
    assert doc["kernel"] == "gelu" and doc["provenance"]["bbct_version"]
