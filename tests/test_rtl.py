"""The cocotb flow end to end: bbct's vectors through the example RTL under Icarus Verilog.

Each test writes vectors (``bbct vectors --kernel``), a testbench (``bbct testbench``) and runs
the generated runner, which builds the RTL and streams every transaction through it. A
mutated RTL (round half up where the spec says half to even) must fail on the corner vectors
with a message naming the first mismatch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bbct.simulator.cli import main

# CI sets BBCT_REQUIRE_RTL: there a missing simulator is a failure, never a silent skip
if os.environ.get("BBCT_REQUIRE_RTL"):
    import cocotb_tools.runner  # noqa: F401

    assert shutil.which("iverilog"), "BBCT_REQUIRE_RTL is set but iverilog is not on PATH"
pytest.importorskip("cocotb_tools.runner", reason="cocotb is installed by the test extra")
pytestmark = pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog (Debian package iverilog)")

RTL = Path(__file__).resolve().parents[1] / "examples" / "rtl"
DUTS = {
    "requantize": ([RTL / "requantize.sv"], "bbct_requantize", 1),
    "gemm": ([RTL / "dot_tile.sv"], "bbct_dot_tile", 0),
}
TIE_RULE = "RND_CONV: q = q + q[0];  // tie rule: half to even"


def _testbench(tb: Path, source: list[str], rtl: list[Path], top: str, vec: Path, latency: int, *extra: str):
    """``bbct testbench`` (``source``: ``--kernel K`` or ``--node NAME``) into ``tb``, then run it."""
    rtl_args = [a for f in rtl for a in ("--rtl", str(f))]
    argv = ["testbench", *source, *rtl_args, "--top", top, "--vectors", str(vec), "--out", str(tb)]
    assert main([*argv, "--latency", str(latency), *extra]) == 0
    return _run(tb)


def _bench(tmp_path: Path, kernel: str, stimulus: str, rtl: list[Path], top: str, latency: int, count: int = 0):
    vec = tmp_path / "vectors"
    argv = ["vectors", "--kernel", kernel, "--stimulus", stimulus, "--count", str(count), "--seed", "7"]
    assert main(argv + ["--out", str(vec)]) == 0
    return _testbench(tmp_path / "tb", ["--kernel", kernel], rtl, top, vec, latency)


def _run(tb: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COCOTB_ANSI_OUTPUT": "0"}
    return subprocess.run(
        [sys.executable, str(tb / "run.py")], capture_output=True, text=True, timeout=300, env=env, cwd=tb
    )


@pytest.mark.parametrize("kernel", sorted(DUTS))
def test_example_rtl_matches_every_vector(tmp_path, capsys, kernel):
    """The corner set padded with random transactions up to 600: both kinds in one simulation."""
    rtl, top, latency = DUTS[kernel]
    proc = _bench(tmp_path, kernel, "corner", rtl, top, latency, 600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    doc = json.loads((tmp_path / "vectors" / "stimulus.json").read_text())
    assert doc["count"] == 600 and all(doc["coverage"].values())
    assert "bbct: 600 transactions" in log and "0 mismatches" in log and "1 test(s), 0 failed" in log


def test_a_wrong_tie_rule_fails_on_the_corner_vectors(tmp_path, capsys):
    good = (RTL / "requantize.sv").read_text()
    assert good.count(TIE_RULE) == 1
    bad = tmp_path / "requantize_half_up.sv"
    bad.write_text(good.replace(TIE_RULE, "RND_CONV: q = q + 1;  // mutated: half up"))
    proc = _bench(tmp_path, "requantize", "corner", [bad], "bbct_requantize", 1)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    line = next(s for s in log.splitlines() if "First mismatch" in s)
    # the first RND_CONV tie with an even floor: 2.5 must become 2, the mutant gives 3
    assert "First mismatch at transaction" in line and "port y: expected 2 (0x02, 0b00000010)" in line, line
    assert "got 3 (0x03, 0b00000011)" in line and "inputs: x=" in line and "rnd=5" in line, line
    assert "Failed 1 of 1 tests" in log


def test_a_model_node_through_the_adapter(tmp_path, capsys, tiny_bert_onnx):
    """`--node`: a static requant node of a real (tiny random) model's dump, on a row of
    requantize units; the node's ports come from vectors.json through node_ports."""
    vec, tb = tmp_path / "vectors", tmp_path / "tb"
    argv = ["vectors", str(tiny_bert_onnx), "--text", "w5 w6 w7", "--text", "w8", "--nodes", "L0.ffn1"]
    assert main(argv + ["--out", str(vec)]) == 0
    rtl = [RTL / "requantize.sv", RTL / "requantize_row.sv"]
    proc = _testbench(tb, ["--node", "L0.ffn1"], rtl, "bbct_requantize_row", vec, 1, "--param", "EXP_OUT=-8")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "0 mismatches" in log and "outputs compared" in log


def test_a_port_of_the_wrong_width_is_named(tmp_path, capsys):
    vec, tb = tmp_path / "vectors", tmp_path / "tb"
    assert main(["vectors", "--kernel", "requantize", "--out", str(vec)]) == 0
    rtl = [RTL / "requantize.sv"]
    proc = _testbench(tb, ["--kernel", "requantize"], rtl, "bbct_requantize", vec, 1, "--param", "OUT_BITS=16")
    assert proc.returncode == 1 and "port y: the DUT's is 16 bits, the vectors need 8" in proc.stdout + proc.stderr
