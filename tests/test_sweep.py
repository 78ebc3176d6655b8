"""bbct sweep on a tiny random BERT: grids, the resumable table, the Pareto plot, and a real
Dask LocalCluster with 2 workers (one of them killed mid-sweep)."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bbct.simulator.cli import main
from bbct.simulator.errors import ConfigError
from bbct.simulator.explore.grid import load_grid
from bbct.simulator.explore.plots import pareto_front
from bbct.simulator.explore.search import to_toml
from bbct.simulator.explore.sweep import BenchSpec, Sweep, run_sweep
from bbct.simulator.tasks import get_task

GRID = """base = "w8a8"
[axes]
weight_bits = [3, 8]
op.intermediate.weight_block = [16, 32]
layer.1.query.act_bits = [6, 8]
"""


def _data(folder: Path, n: int = 24) -> Path:
    """A labelled split over the tiny vocabulary (words w5..w99; the model is random)."""
    rng = np.random.default_rng(1)
    rows = ["sentence\tlabel"]
    for i in range(n):
        rows.append(" ".join(f"w{j}" for j in rng.integers(5, 100, rng.integers(2, 12))) + f"\t{i % 2}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _png_size(p: Path) -> tuple[int, int]:
    b = p.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    return struct.unpack(">II", b[16:24])


def _sweep(tiny_bert_onnx, tmp_path, grid_text=GRID, out="out"):
    (tmp_path / "grid.toml").write_text(grid_text)
    grid = load_grid(tmp_path / "grid.toml")
    spec = BenchSpec(str(tiny_bert_onnx), get_task("sst-2"), str(_data(tmp_path / "data")), "test", None)
    return Sweep(grid, spec, tmp_path / out, grid.points())


def test_grid_axes_points_and_samples(tmp_path):
    (tmp_path / "g.toml").write_text(GRID + 'node."L0.ffn*".weight_bits = [4, 6]\n')
    g = load_grid(tmp_path / "g.toml")
    assert [a.name for a in g.axes] == [
        "weight_bits",
        "op.intermediate.weight_block",
        "layer.1.query.act_bits",
        'node."L0.ffn*".weight_bits',
    ]
    assert g.size == 16 and len(g.points()) == 16
    t = g.point((3, 16, 6, 4))
    assert t["preset"] == "w8a8" and t["default"]["weight_bits"] == 3
    assert t["op"]["intermediate"]["weight_block"] == 16 and t["layer"]["1"]["query"]["act_bits"] == 6
    assert t["node"]["L0.ffn*"]["weight_bits"] == 4
    # a Latin hypercube of 4 points covers both values of every 2-valued axis twice
    lhs = g.points(4, "lhs", seed=3)
    assert len(lhs) == 4
    for i in range(4):
        assert sorted(p[i] for p in lhs).count(lhs[0][i]) == 2
    rnd = g.points(5, "random", seed=0)
    assert len(set(rnd)) == 5 and set(rnd) <= set(g.points())


@pytest.mark.parametrize(
    "text, match",
    [
        ("[axes]\nweight_bits = [4, 40]\n", r"axis weight_bits = 40: .*weight_bits=40: expected an integer in 2..16"),
        ("[axes]\nop.nosuch.weight_bits = [4]\n", r"unknown op class 'nosuch'"),
        ("[axes]\nweight_bits = 4\n", r"expected a non-empty list"),
        ('base = "nope"\n', r"neither a preset"),
        ("[axes]\nweight_bitz = [4]\n", r"unknown key 'weight_bitz'"),
    ],
)
def test_grid_errors_name_the_axis(tmp_path, text, match):
    (tmp_path / "g.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_grid(tmp_path / "g.toml")


def test_sweep_rows_resume_and_pareto(tiny_bert_onnx, tmp_path, capsys):
    sw = _sweep(tiny_bert_onnx, tmp_path)
    seen = []
    table = run_sweep(sw, workers=0, on_row=seen.append)
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(seen) == 8 and len({r["key"] for r in rows}) == 8
    for r in rows:
        assert r["error"] is None
        assert {"weight_bits", "op.intermediate.weight_block", "layer.1.query.act_bits"} <= set(r)
        for k in ("int_accuracy", "drop_points", "agreement", "weight_compression", "overflow_count", "wall_s"):
            assert r[k] is not None, k
        assert r["worst_layer_sqnr_db"] is not None and r["model_sha256"]
    # 3-bit weights store fewer bits than 8-bit ones: compression follows the axis
    by = {(r["weight_bits"], r["op.intermediate.weight_block"], r["layer.1.query.act_bits"]): r for r in rows}
    assert by[(3, 32, 8)]["weight_compression"] > 2 * by[(8, 32, 8)]["weight_compression"]
    assert by[(3, 32, 8)]["worst_layer_sqnr_db"] < by[(8, 32, 8)]["worst_layer_sqnr_db"]
    header = (tmp_path / "out" / "rows.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["key", "point", "weight_bits", "op.intermediate.weight_block", "layer.1.query.act_bits"]
    # resumed: nothing is recomputed, the table is unchanged
    again = []
    run_sweep(_sweep(tiny_bert_onnx, tmp_path), workers=0, on_row=again.append)
    assert again == [] and len(table.rows) == 8
    # one point checked against `bbct eval` of the same config written as a TOML file
    p = by[(3, 16, 6)]
    cfg = tmp_path / "point.toml"
    cfg.write_text(to_toml(p["config"]))
    js = tmp_path / "e.json"
    args = ["eval", str(tiny_bert_onnx), "--task", "sst-2", "--data", str(tmp_path / "data"), "--config", str(cfg)]
    assert main(args + ["--json", str(js)]) == 0
    e = json.loads(js.read_text())
    for k in ("int_accuracy", "float_accuracy", "agreement", "weight_compression", "overflow_count"):
        assert e[k] == p[k], k


def test_the_batch_size_is_part_of_a_points_key(tiny_bert_onnx, tmp_path):
    """Each batch's padding can reach a block or matrix exponent, so rows of another batch size
    are not reused, nor is a Bench built for it."""
    import dataclasses

    sw = _sweep(tiny_bert_onnx, tmp_path)
    other = dataclasses.replace(sw, spec=dataclasses.replace(sw.spec, batch=8))
    assert sw.spec.ident() != other.spec.ident()
    assert {k for k, _, _ in sw.plan()}.isdisjoint(k for k, _, _ in other.plan())


def test_sweep_cli_writes_table_and_plots(tiny_bert_onnx, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(GRID)
    data = _data(tmp_path / "data")
    out = tmp_path / "sw"
    args = ["sweep", str(tiny_bert_onnx), "--grid", str(tmp_path / "grid.toml"), "--task", "sst-2"]
    args += ["--data", str(data), "--out", str(out), "--workers", "0", "--max", "4", "--sample", "lhs"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Pareto front" in text
    rows = [json.loads(ln) for ln in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    summary = json.loads((out / "summary.json").read_text())
    # the plotted front is the front of the rows the command wrote
    assert [f["key"] for f in summary["front"]] == [r["key"] for r in pareto_front(rows, y="drop_points")]
    assert _png_size(out / "pareto.png") == (800, 600)
    assert _png_size(out / "sensitivity.png")[1] == 400
    code = main(["sweep", str(tiny_bert_onnx), "--grid", str(tmp_path / "none.toml"), "--out", str(out)])
    assert code == 2


def test_pareto_front_by_hand():
    rows = [
        {"key": "a", "weight_compression": 4.0, "drop_points": 0.1},
        {"key": "b", "weight_compression": 8.0, "drop_points": 0.5},
        {"key": "c", "weight_compression": 6.0, "drop_points": 0.6},  # beaten by b on both
        {"key": "d", "weight_compression": 10.0, "drop_points": 2.0},
        {"key": "e", "weight_compression": 3.0, "drop_points": 0.1},  # beaten by a (same drop, less compression)
        {"key": "f", "weight_compression": 12.0, "drop_points": None, "error": "x"},
    ]
    assert [r["key"] for r in pareto_front(rows, y="drop_points")] == ["a", "b", "d"]


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, memory_limit=0
        ) as c,
        distributed.Client(c) as client,
    ):
        yield c, client


def _results(table) -> dict:
    keys = (
        "int_accuracy",
        "float_accuracy",
        "agreement",
        "weight_compression",
        "overflow_count",
        "worst_layer_sqnr_db",
    )
    return {k: tuple(r[k] for r in [row] for k in keys) for k, row in table.rows.items()}


def test_dask_cluster_matches_serial_and_survives_a_killed_worker(tiny_bert_onnx, tmp_path, cluster):
    c, client = cluster
    serial = run_sweep(_sweep(tiny_bert_onnx, tmp_path, out="serial"), workers=0)
    par = run_sweep(_sweep(tiny_bert_onnx, tmp_path, out="dask"), client=client)
    assert _results(par) == _results(serial)
    # both workers took points (each keeps its own model)
    assert len({r["worker_pid"] for r in par.rows.values()}) == 2

    # kill a worker (SIGKILL, as an out-of-memory killer or a lost batch node would) while it
    # holds a point: the scheduler gives that point to a worker again, and it is written once
    pids = client.run(os.getpid)
    killed = []

    def kill_one():
        t_end = time.time() + 120
        while time.time() < t_end and not killed:
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                pid = pids[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    grid2 = GRID.replace("[3, 8]", "[3, 5, 8]")  # points the first sweep did not run
    sw = _sweep(tiny_bert_onnx, tmp_path, grid_text=grid2, out="killed")
    th = threading.Thread(target=kill_one)
    th.start()
    table = run_sweep(sw, client=client)
    th.join()
    assert killed, "no worker was busy to kill"
    rows = [json.loads(ln) for ln in (tmp_path / "killed" / "rows.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 12 == len(sw.plan())
    assert all(r["error"] is None for r in rows)
    assert killed[0] not in {r["worker_pid"] for r in rows}  # every row came from a live worker
    # the rows shared with the first sweep are the same numbers
    common = set(table.rows) & set(serial.rows)
    assert len(common) == 8
    assert {k: _results(table)[k] for k in common} == _results(serial)
