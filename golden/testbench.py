"""``bbct testbench``: a cocotb test and its runner that stream a vector set through a DUT.

The generated folder holds three files:

* ``bench.json`` — the DUT (RTL file, top module, HDL parameters, simulator), the clocking
  (``latency`` 0: combinational, drive then sample after 1 ns; ``latency`` L > 0: one
  transaction per rising edge of ``clk``, outputs sampled L edges later) and every port
  (direction, width, signedness, lanes, the hex file that holds its values);
* ``test_<top>.py`` — the cocotb test: drives each transaction's inputs, compares every
  output lane, and fails with the first mismatching transaction, port and lane, the expected
  and received values (decimal, hex and bits) and the inputs that produced them;
* ``run.py`` — builds the RTL with Icarus Verilog (``-g2012``) through cocotb's Python runner
  (``cocotb_tools.runner``) and runs the test; exit status 0 only if every output matched.

Vector sets come from ``bbct vectors --kernel`` (:mod:`bbct.golden.stimulus`, ``stimulus.json``)
or, with ``--node``, from a model dump (``bbct vectors MODEL``, ``vectors.json``) through the
one adapter :func:`node_ports`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bbct.golden.atomic import write_text
from bbct.golden.errors import BbctError
from bbct.golden.stimulus import MANIFEST


def kernel_ports(vectors: Path, kernel: str) -> dict[str, Any]:
    """The bench description of a ``bbct vectors --kernel`` folder."""
    path = vectors / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        why = f"cannot read the stimulus manifest ({e}); write it with bbct vectors --kernel"
        raise BbctError(f"{path}: {why}") from None
    if doc.get("kernel") != kernel:
        raise BbctError(f"{path}: holds vectors of kernel {doc.get('kernel')!r}, not {kernel!r}")
    ports = [{**p, "path": str((vectors / p["file"]).resolve())} for p in doc["ports"]]
    return {"count": doc["count"], "ports": ports, "hdl_parameters": doc.get("hdl_parameters", {})}


def node_ports(vectors: Path, node: str) -> dict[str, Any]:
    """The bench description of one node of a model dump (``vectors.json``): the adapter from
    the model-vector manifest to the bench.

    Each non-constant file of the node becomes a port named after its manifest port (``.``
    becomes ``_``: ``in0``, ``in0_exp``, ``out``, ``out_exp``); ``out*`` ports are outputs.
    One transaction is one row (the last axis is the port's lanes), so every port of the node
    must have the same number of rows; the width is the file's port ``bits``, signed unless its
    format says unsigned or the file holds 1-bit flags. A dump made with ``--constants once``
    holds one stimulus per text; the first text's (``input0/``) is streamed.
    """
    path = vectors / "vectors.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BbctError(f"{path}: cannot read the vector manifest ({e}); write it with bbct vectors MODEL") from None
    files = [f for f in doc.get("files", []) if f.get("node") == node and not f.get("constant")]
    if not files:
        nodes = sorted({f.get("node") for f in doc.get("files", [])})
        raise BbctError(f"{path}: no vectors of node {node!r}; nodes in it: {', '.join(map(str, nodes[:12]))}")
    first = min((f.get("input") or 0 for f in files), default=0)  # --constants once: the first text's stimulus
    files = [f for f in files if (f.get("input") or 0) == first]
    ports, rows = [], set()
    for f in files:
        shape = f["shape"] or [1]
        lanes = int(shape[-1])
        rows.add((int(_prod(shape)) // lanes) if lanes else 0)
        signed = bool(f.get("format", {}).get("signed", True)) and "flags" not in f
        name = f["port"].replace(".", "_")
        ports.append(
            {
                "name": name,
                "direction": "out" if f["port"].startswith("out") else "in",
                "bits": int(f["bits"]),
                "signed": signed,
                "lanes": lanes,
                "path": str((vectors / f["file"]).resolve()),
                "doc": f.get("tensor", ""),
            }
        )
    if len(rows) != 1:
        raise BbctError(f"{path}: the ports of node {node!r} have different row counts {sorted(rows)}")
    return {"count": rows.pop(), "ports": ports, "hdl_parameters": {}}


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def parse_params(specs: list[str] | None) -> dict[str, int]:
    """``NAME=INT`` HDL parameter overrides (``--param``)."""
    params = {}
    for spec in specs or []:
        name, eq, value = spec.partition("=")
        try:
            if not (eq and name.isidentifier()):
                raise ValueError
            params[name] = int(value, 0)
        except ValueError:
            raise BbctError(f"--param {spec!r}: expected NAME=INTEGER, e.g. EXP_OUT=-8") from None
    return params


def write_testbench(
    vectors: str | Path,
    rtl: list[str | Path],
    top: str,
    out: str | Path,
    kernel: str | None = None,
    node: str | None = None,
    latency: int = 0,
    parameters: dict[str, int] | None = None,
    simulator: str = "icarus",
) -> Path:
    """Write ``bench.json``, ``test_<top>.py`` and ``run.py`` into ``out``; returns ``run.py``.

    ``rtl``: the DUT's source files; ``parameters`` override or add HDL parameters (a kernel
    vector set brings its own, e.g. ``OUT_BITS``)."""
    vectors, out = Path(vectors), Path(out)
    if (kernel is None) == (node is None):
        raise BbctError("give exactly one of --kernel K and --node NAME")
    for f in rtl:
        if not Path(f).is_file():
            raise BbctError(f"--rtl {f}: no such file")
    if not top.isidentifier():
        raise BbctError(f"--top {top!r}: not a module name")
    if latency < 0:
        raise BbctError(f"--latency {latency}: must be >= 0")
    desc = kernel_ports(vectors, kernel) if kernel else node_ports(vectors, node)
    desc["hdl_parameters"] = {**desc["hdl_parameters"], **(parameters or {})}
    bench = {
        "kernel": kernel,
        "node": node,
        "rtl": [str(Path(f).resolve()) for f in rtl],
        "top": top,
        "simulator": simulator,
        "latency": latency,
        **desc,
    }
    write_text(out / "bench.json", json.dumps(bench, indent=1) + "\n")
    write_text(out / f"test_{top}.py", TEST_TEMPLATE.replace("@TOP@", top))
    return write_text(out / "run.py", RUN_TEMPLATE.replace("@TOP@", top))


TEST_TEMPLATE = '''\
"""cocotb test written by `bbct testbench`: streams the vectors of bench.json through @TOP@
and compares every output; a mismatch fails with its transaction, expected and received values
(decimal, hex, bits) and the inputs that produced it."""

import json
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge, Timer

BENCH = json.loads((Path(__file__).resolve().parent / "bench.json").read_text())


def load(port):
    """Transaction-major lists of the port's lane values (sign-extended when signed)."""
    bits, lanes, n = port["bits"], port["lanes"], BENCH["count"]
    vals = [int(s, 16) for s in Path(port["path"]).read_text().split()]
    if len(vals) != n * lanes:
        raise ValueError(f"{port['path']}: {len(vals)} values, expected {n} transactions x {lanes} lanes")
    if port["signed"]:
        vals = [v - (1 << bits) if v >> (bits - 1) else v for v in vals]
    return [vals[i * lanes : (i + 1) * lanes] for i in range(n)]


def pack(values, bits):
    mask = (1 << bits) - 1
    return sum((v & mask) << (i * bits) for i, v in enumerate(values))


def show(v, bits):
    """A value in decimal, hex and bits (None: the DUT drove X or Z)."""
    if v is None:
        return "X/Z"
    u = v & ((1 << bits) - 1)
    return f"{v} (0x{u:0{max(1, -(-bits // 4))}x}, 0b{u:0{bits}b})"


def sample(handle, port):
    """The lane values an output shows now, or None per lane when it is not 0/1."""
    bits, lanes = port["bits"], port["lanes"]
    text = str(handle.value)
    out = []
    for i in range(lanes):
        lane = text[len(text) - (i + 1) * bits : len(text) - i * bits]
        if set(lane) - {"0", "1"}:
            out.append(None)
            continue
        u = int(lane, 2)
        out.append(u - (1 << bits) if port["signed"] and u >> (bits - 1) else u)
    return out


@cocotb.test()
async def stream_vectors(dut):
    ports = BENCH["ports"]
    ins = [p for p in ports if p["direction"] == "in"]
    outs = [p for p in ports if p["direction"] == "out"]
    data = {p["name"]: load(p) for p in ports}
    n, latency = BENCH["count"], BENCH["latency"]
    mismatches = []
    for p in ports + ([{"name": "clk", "bus_bits": 1}] if latency else []):
        handle = getattr(dut, p["name"], None)
        width = p.get("bus_bits", p.get("bits", 1) * p.get("lanes", 1))
        if handle is None:
            raise AssertionError(f"the DUT has no port {p['name']!r} ({width} bits); bench.json lists its ports")
        if len(handle) != width:
            raise AssertionError(f"port {p['name']}: the DUT's is {len(handle)} bits, the vectors need {width}")

    def drive(i):
        for p in ins:
            getattr(dut, p["name"]).value = pack(data[p["name"]][i], p["bits"])

    def check(i):
        for p in outs:
            got = sample(getattr(dut, p["name"]), p)
            for lane, (e, g) in enumerate(zip(data[p["name"]][i], got)):
                if e != g:
                    mismatches.append((i, p, lane, e, g))

    if latency == 0:
        for i in range(n):
            drive(i)
            await Timer(1, "ns")
            check(i)
    else:
        cocotb.start_soon(Clock(dut.clk, 10, "ns").start())
        for i in range(n + latency - 1):
            await FallingEdge(dut.clk)
            if i < n:
                drive(i)
            await RisingEdge(dut.clk)
            await ReadOnly()
            if i - (latency - 1) >= 0:
                check(i - (latency - 1))
    checked = n * sum(p["lanes"] for p in outs)
    if mismatches:
        i, p, lane, e, g = mismatches[0]
        where = f"port {p['name']}" + (f" lane {lane}" if p["lanes"] > 1 else "")
        inputs = "; ".join(
            f"{q['name']}=" + ",".join(show(v, q["bits"]) if q["lanes"] == 1 else str(v) for v in data[q["name"]][i])
            for q in ins
        )
        raise AssertionError(
            f"{len(mismatches)} of {checked} outputs differ. First mismatch at transaction {i}, {where}: "
            f"expected {show(e, p['bits'])}, got {show(g, p['bits'])}; inputs: {inputs}"
        )
    dut._log.info(f"bbct: {n} transactions, {checked} outputs compared, 0 mismatches")
'''

RUN_TEMPLATE = '''\
"""Runner written by `bbct testbench`: builds the RTL and runs test_@TOP@.py with cocotb.
Exit status 0 only when every output matched. Usage: python run.py"""

import json
import sys
from pathlib import Path

from cocotb_tools.check_results import get_results
from cocotb_tools.runner import get_runner

HERE = Path(__file__).resolve().parent
BENCH = json.loads((HERE / "bench.json").read_text())


def main() -> int:
    runner = get_runner(BENCH["simulator"])
    build = HERE / "sim_build"
    runner.build(
        sources=BENCH["rtl"],
        hdl_toplevel=BENCH["top"],
        build_dir=build,
        build_args=["-g2012"],
        parameters=BENCH["hdl_parameters"],
        timescale=("1ns", "1ps"),
        always=True,
    )
    xml = runner.test(
        test_module="test_@TOP@",
        hdl_toplevel=BENCH["top"],
        build_dir=build,
        test_dir=HERE,
        timescale=("1ns", "1ps"),
    )
    tests, fails = get_results(xml)
    print(f"bbct testbench: {tests} test(s), {fails} failed")
    return 0 if tests and not fails else 1


if __name__ == "__main__":
    sys.exit(main())
'''
