"""Benchmark the integer simulator against onnxruntime on the prepared RT classifier.

Usage (each prints the whole table and writes JSON, default ``bench/results/simulator.json``)::

    python3 tools/bench_simulator.py                      # RT classifier, batch 32 x 64, 2 threads
    python3 tools/bench_simulator.py --side-by-side       # ... and every engine again, two at once
    python3 tools/bench_simulator.py --growth             # seq 64/128/256/512 (batch 8) + BERT-base-sized
    options: [--model PATH] [--batch 32] [--seq 64] [--threads 2] [--repeats 5]
             [--configs w8a8 w4a8 mx-int8] [--json PATH]

Engines, all in the same run, on the same batch (real RT test sentences, padded to ``--seq``):

* ``ort-fp32``: onnxruntime on the float model, full graph optimisations;
* ``ort-int8-dynamic``: onnxruntime's own ``quantize_dynamic`` (int8 weights, per-tensor
  dynamic activations; LayerNorm, softmax and GELU stay in float);
* ``bbct-<config>``: the bit-accurate integer simulator (``Simulator.run``), Numba kernels.

Each engine runs in its own child process so its peak resident memory is its own: model load
+ setup + the timed runs (VmHWM, read after setup and again after the runs, the mark reset in
between: the ``setup/run peak MB`` column; for ``w4a8`` the setup's is GPTQ calibration's).
Time is the median wall time of ``--repeats`` runs after one warm-up (JIT compilation and
session creation excluded; Numba's on-disk cache makes later setups fast). ``vs_ort_fp32``
is that median over ort-fp32's (target for bbct: <= 1.5).
The simulator rows also get a per-op time breakdown from one profiled run, and per linear
shape the achieved GFLOP/s (2*M*K*N per product) next to numpy's float32 and float64 GEMM of
the same shape in the same process (how far the exact integer products are from the BLAS).

``--side-by-side`` then starts two copies of every engine at the same time and reports each
engine's slowdown (median of the pair over its median alone): bbct should slow down no more
than onnxruntime does. ``--growth`` runs ort-fp32 and ``bbct-w8a8`` (``--configs`` to change)
at batch 8 over sequence lengths 64, 128, 256 and 512 on the RT classifier, and on a
12-layer hidden-768 BERT with *random weights* (built here with ``transformers``, labelled
``random`` in the table; needs torch) at 8 x 128; targets: ratio <= 2 and memory growing no
faster than onnxruntime's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sentences(n: int) -> list[str]:
    from bbct.golden.data import read_split
    from bbct.golden.paths import data_dir

    texts, _ = read_split(data_dir(), "test")
    return list(texts[:n])


def _feeds(model: Path, batch: int, seq: int) -> dict:
    from bbct.golden.tokenize import encode, find_tokenizer

    tok = find_tokenizer(model)
    return encode(tok, _sentences(batch), max_length=seq, pad_to=seq)


def random_bert_base(folder: Path) -> Path:
    """A 12-layer, hidden-768, 12-head BERT classifier with RANDOM weights (BERT-base sized,
    not a trained model), exported to ONNX with a WordPiece tokenizer over the RT vocabulary
    of the prepared classifier; cached in ``folder``."""
    import json as _json
    import shutil

    import torch
    import transformers

    from bbct.golden.paths import default_model

    out = folder / "random-bert-base-768x12"
    onnx_path = out / "model.onnx"
    if onnx_path.exists():
        return onnx_path
    final, out = (
        out,
        Path(tempfile.mkdtemp(prefix=".random-bert-", dir=folder.mkdir(parents=True, exist_ok=True) or folder)),
    )
    onnx_path = out / "model.onnx"
    src = default_model().parent
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    vocab = len(_json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.tensor([[101, 2023, 2003, 102]])
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Wrap(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    axes = {n: {0: "batch", 1: "seq"} for n in names}
    torch.onnx.export(
        Wrap(model),
        args,
        str(onnx_path),
        input_names=names,
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
        dynamic_axes=axes,
    )
    (out / "config.json").write_text(_json.dumps({"random_weights": True, "layers": 12, "hidden": 768}))
    os.replace(out, final)  # the folder appears whole or not at all
    return final / "model.onnx"


def _blas_gflops(m: int, k: int, n: int, reps: int = 3) -> dict[str, float]:
    """numpy float32 / float64 GEMM of one shape, GFLOP/s (best of ``reps``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for ft in (np.float32, np.float64):
        a, b = rng.standard_normal((m, k)).astype(ft), rng.standard_normal((k, n)).astype(ft)
        best = min(_time(lambda a=a, b=b: a @ b, reps))
        out[f"numpy_{np.dtype(ft).name}_gflops"] = 2 * m * k * n / best / 1e9
    return out


def _linear_table(sim, feeds: dict) -> list[dict]:
    """Per linear shape: products, bbct time each and GFLOP/s, numpy float32/64 GEMM GFLOP/s."""
    import bbct.simulator.execute as ex
    from bbct.simulator import ir

    seen: dict[tuple[int, int, int], list[float]] = {}
    orig = ex.HANDLERS[ir.Linear]

    def timed(n, x):
        t0 = time.perf_counter()
        out = orig(n, x)
        k, nn = n.weight.shape
        seen.setdefault((x.data.size // k, k, nn), []).append(time.perf_counter() - t0)
        return out

    ex.HANDLERS[ir.Linear] = timed
    try:
        sim.run(feeds)
    finally:
        ex.HANDLERS[ir.Linear] = orig
    rows = []
    for (m, k, n), ts in sorted(seen.items()):
        each = statistics.median(ts)
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "count": len(ts),
                "bbct_ms": 1e3 * each,
                "bbct_gflops": 2 * m * k * n / each / 1e9,
                **_blas_gflops(m, k, n),
            }
        )
    return rows


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: JIT, allocator, ORT's first-run kernels
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def child(engine: str, model: Path, batch: int, seq: int, threads: int, repeats: int, linears: bool = True) -> dict:
    """Run one engine and return its measurements (called in a fresh process)."""
    import numpy as np

    if "random" in model.parent.name:  # random ids for the random-weight model
        rng = np.random.default_rng(0)
        feeds = {
            "input_ids": rng.integers(1000, 20000, (batch, seq)),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
    else:
        feeds = _feeds(model, batch, seq)
    t_setup = time.perf_counter()
    extra: dict = {}
    if engine.startswith("ort-"):
        path = model
        if engine == "ort-int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmpdir = Path(tempfile.mkdtemp(prefix="bbct-bench-"))
            tmp = tmpdir / "model.int8.onnx"
            link = tmpdir / "model.onnx"  # quantize_dynamic writes a shape-inferred copy beside its input
            link.symlink_to(model.resolve())
            quantize_dynamic(str(link), str(tmp), weight_type=QuantType.QInt8)
            path = tmp
            extra["model_bytes"] = tmp.stat().st_size
        sess = _ort_session(path, threads)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feeds.items() if k in names}
        out_name = sess.get_outputs()[0].name

        def once():
            return sess.run([out_name], f)[0]

    else:
        from bbct.golden.data import read_split
        from bbct.golden.paths import data_dir
        from bbct.simulator.config import load_config
        from bbct.simulator.session import Simulator

        cfg = load_config(engine.removeprefix("bbct-"))
        calib = read_split(data_dir(), "calib")[0] if cfg.needs_calibration else None  # w4a8: GPTQ
        sim = Simulator(model, cfg, calib_texts=calib, threads=threads, max_length=seq)

        def once():
            r = sim.run(feeds)
            role = "logits" if "logits" in r.outputs else "last_hidden_state"
            return r.outputs[role].dequantize()

    setup_s = time.perf_counter() - t_setup
    setup_peak = _peak_mb(reset=True)  # GPTQ calibration's peak is the setup's (w4a8)
    times = _time(once, repeats)
    logits = np.asarray(once())
    run_peak = _peak_mb()  # before the profiling below, whose numpy GEMMs are not the engine's
    if engine.startswith("bbct-"):
        prof: dict[str, float] = {}
        sim.run(feeds, profile=prof)
        extra["profile_s"] = dict(sorted(prof.items(), key=lambda kv: -kv[1]))
        if linears:
            extra["linears"] = _linear_table(sim, feeds)
    return {
        "engine": engine,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "setup_s": setup_s,
        "peak_rss_mb": (
            max(setup_peak, run_peak)
            if setup_peak is not None and run_peak is not None
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "setup_peak_mb": setup_peak,
        "run_peak_mb": run_peak,
        "pred": logits.argmax(-1).tolist() if logits.ndim == 2 else None,
        **extra,
    }


def _peak_mb(reset: bool = False) -> float | None:
    """This process's peak resident MB so far (VmHWM); with ``reset`` the mark is then set back
    to the current size, so the next reading is the peak of what runs after. None where
    /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return kb / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _spawn(eng: str, model: Path, batch: int, seq: int, args: argparse.Namespace, env: dict, linears: bool):
    cmd = [sys.executable, __file__, "--child", eng, "--model", str(model), "--batch", str(batch), "--seq", str(seq)]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)] + ([] if linears else ["--no-linears"])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(p: subprocess.Popen, eng: str) -> dict:
    out, err = p.communicate()
    if p.returncode != 0:
        print(err, file=sys.stderr)
        raise SystemExit(f"bench: engine {eng} failed (exit {p.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def run_engines(
    engines: list[str], model: Path, batch: int, seq: int, args, env, copies: int = 1, linears: bool = True
) -> list[dict]:
    """Each engine in its own child process; ``copies`` > 1 starts that many at the same time
    and returns the first's row with ``pair_median_s``, the median over the copies' medians."""
    rows = []
    for eng in engines:
        print(f"running {eng} x{copies} (batch {batch} x {seq}) ...", file=sys.stderr, flush=True)
        procs = [_spawn(eng, model, batch, seq, args, env, linears) for _ in range(copies)]
        res = [_collect(p, eng) for p in procs]
        row = res[0]
        if copies > 1:
            row["pair_median_s"] = statistics.median(r["median_s"] for r in res)
            row["pair_medians_s"] = [r["median_s"] for r in res]
        rows.append(row)
    return rows


def _linear_floor(rows: list[dict]) -> None:
    """Per simulator row: its linears' total time against numpy float64 / float32 GEMM of the
    same products (at the rates measured in that process), and the float64 total over
    onnxruntime fp32's whole run. bbct's products are exact in float64 (docs/KERNELS.md,
    gemm), so the float64 total bounds from below what this exact path can reach here."""
    base = next((r["median_s"] for r in rows if r["engine"] == "ort-fp32"), None)
    for r in rows:
        lin = r.get("linears")
        if not lin:
            continue
        fl = {"bbct_ms": sum(li["count"] * li["bbct_ms"] for li in lin)}
        for ft in ("float64", "float32"):
            fl[f"{ft}_ms"] = sum(
                li["count"] * 2 * li["m"] * li["k"] * li["n"] / li[f"numpy_{ft}_gflops"] / 1e6 for li in lin
            )
        if base:
            fl["float64_vs_ort_fp32"] = fl["float64_ms"] / 1e3 / base
        r["linear_floor"] = fl


def _ratios(rows: list[dict]) -> None:
    base = rows[0]
    for r in rows:
        r["vs_ort_fp32"] = r["median_s"] / base["median_s"]
        r["mem_vs_ort_fp32"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        if r.get("pred") is not None and base.get("pred") is not None:
            same = sum(a == b for a, b in zip(r["pred"], base["pred"], strict=True))
            r["agreement_with_fp32"] = same / len(r["pred"])
    _linear_floor(rows)


def _print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'engine':<20}{'median ms':>11}{'min ms':>9}{'vs fp32':>9}{'peak MB':>9}{'mem x':>7}"
        f"{'setup s':>9}{'agree':>7}{'setup/run peak MB':>19}"
    )
    for r in rows:
        agree = r.get("agreement_with_fp32")
        print(
            f"{r['engine']:<20}{1e3 * r['median_s']:>11.1f}{1e3 * r['min_s']:>9.1f}{r['vs_ort_fp32']:>8.2f}x"
            f"{r['peak_rss_mb']:>9.0f}{r['mem_vs_ort_fp32']:>6.2f}x{r['setup_s']:>9.1f}"
            f"{'' if agree is None else f'{agree:.2f}':>7}"
            f"{_peaks(r):>19}"
        )


def _peaks(r: dict) -> str:
    s, u = r.get("setup_peak_mb"), r.get("run_peak_mb")
    return "" if s is None or u is None else f"{s:.0f} / {u:.0f}"


def _print_profiles(rows: list[dict]) -> None:
    for r in rows:
        if "profile_s" in r:
            tot = sum(r["profile_s"].values())
            parts = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in r["profile_s"].items() if v >= 5e-4)
            print(f"  {r['engine']} per op (ms, one run, {1e3 * tot:.0f} total): {parts}")
    for r in rows:
        if r.get("linears"):
            print(f"  {r['engine']} linears (M x K x N: count, ms each, GFLOP/s; numpy GEMM GFLOP/s f32 / f64):")
            for li in r["linears"]:
                print(
                    f"    {li['m']:>6} x {li['k']:>5} x {li['n']:>5}: {li['count']:>3}, {li['bbct_ms']:8.1f} ms, "
                    f"{li['bbct_gflops']:6.1f}; numpy {li['numpy_float32_gflops']:6.1f} / "
                    f"{li['numpy_float64_gflops']:6.1f}"
                )
            fl = r.get("linear_floor")
            if fl:
                print(
                    f"    all linears: bbct {fl['bbct_ms']:.0f} ms; the same products as numpy GEMM: float64 "
                    f"{fl['float64_ms']:.0f} ms ({fl['float64_vs_ort_fp32']:.2f}x onnxruntime fp32's whole run), "
                    f"float32 {fl['float32_ms']:.0f} ms"
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="ONNX classifier (default: the prepared RT one)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--configs", nargs="+", default=None, help="bbct presets (default: w8a8 w4a8 mx-int8; growth: w8a8)"
    )
    ap.add_argument("--side-by-side", action="store_true", help="also run two copies of every engine at once")
    ap.add_argument("--growth", action="store_true", help="seq 64..512 at batch 8, and a random BERT-base-sized model")
    ap.add_argument("--json", type=Path, default=None, help="default bench/results/simulator[-growth].json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-linears", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from bbct.golden.paths import default_model

        args.model = default_model()
    if args.child:
        res = child(args.child, args.model, args.batch, args.seq, args.threads, args.repeats, not args.no_linears)
        print(json.dumps(res))
        return 0

    env = dict(
        os.environ,
        NUMBA_NUM_THREADS=str(args.threads),
        OMP_NUM_THREADS=str(args.threads),
        OPENBLAS_NUM_THREADS=str(args.threads),
    )
    out: dict = {
        "model": str(args.model),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "target_vs_ort_fp32": 1.5,
    }
    if args.growth:
        configs = args.configs or ["w8a8"]
        engines = ["ort-fp32"] + [f"bbct-{c}" for c in configs]
        growth = []
        for seq in (64, 128, 256, 512):
            rows = run_engines(engines, args.model, 8, seq, args, env, linears=False)
            _ratios(rows)
            _print_rows(f"growth: RT classifier {args.model.name}, batch 8 x seq {seq}, {args.threads} threads", rows)
            _print_profiles(rows)
            growth.append({"model": args.model.name, "random_weights": False, "batch": 8, "seq": seq, "rows": rows})
        big = random_bert_base(Path(tempfile.gettempdir()) / "bbct-bench-models")  # ~440 MB, outside the repo
        rows = run_engines(engines, big, 8, 128, args, env)
        _ratios(rows)
        _print_rows(
            f"growth: 12-layer hidden-768 BERT, RANDOM weights (random), batch 8 x 128, {args.threads} threads", rows
        )
        _print_profiles(rows)
        growth.append(
            {
                "model": "random BERT-base-sized (12 x 768, random weights)",
                "random_weights": True,
                "batch": 8,
                "seq": 128,
                "rows": rows,
            }
        )
        print("\nsummary (ratio to ort-fp32 time; memory ratio):")
        for g in growth:
            for r in g["rows"][1:]:
                tag = "random 12x768" if g["random_weights"] else "RT classifier"
                print(
                    f"  {tag:<15} {g['batch']} x {g['seq']:<4} {r['engine']:<12} {r['vs_ort_fp32']:6.2f}x time  "
                    f"{r['mem_vs_ort_fp32']:5.2f}x memory "
                    f"({r['peak_rss_mb']:.0f} vs {g['rows'][0]['peak_rss_mb']:.0f} MB)"
                )
        out["target_growth_vs_ort_fp32"] = 2.0
        out["growth"] = growth
        default_json = ROOT / "bench" / "results" / "simulator-growth.json"
    else:
        configs = args.configs or ["w8a8", "w4a8", "mx-int8"]
        engines = ["ort-fp32", "ort-int8-dynamic"] + [f"bbct-{c}" for c in configs]
        rows = run_engines(engines, args.model, args.batch, args.seq, args, env)
        _ratios(rows)
        _print_rows(
            f"RT classifier {args.model.name}, batch {args.batch} x seq {args.seq}, {args.threads} threads", rows
        )
        _print_profiles(rows)
        if args.side_by_side:
            pairs = run_engines(engines, args.model, args.batch, args.seq, args, env, copies=2, linears=False)
            print("\ntwo copies of each engine at once (slowdown = median of the pair / median alone):")
            for r, p in zip(rows, pairs, strict=True):
                r["side_by_side_median_s"] = p["pair_median_s"]
                r["side_by_side_medians_s"] = p["pair_medians_s"]
                r["side_by_side_slowdown"] = p["pair_median_s"] / r["median_s"]
                print(
                    f"  {r['engine']:<20}{1e3 * p['pair_median_s']:>10.1f} ms  "
                    f"slowdown {r['side_by_side_slowdown']:.2f}x"
                )
            ort = rows[0]["side_by_side_slowdown"]
            for r in rows:
                r["side_by_side_vs_ort"] = r["side_by_side_slowdown"] / ort
        for r in rows:
            r.pop("pred", None)
        out.update(batch=args.batch, seq=args.seq, rows=rows)
        default_json = ROOT / "bench" / "results" / "simulator.json"
    path = args.json or default_json
    path.parent.mkdir(parents=True, exist_ok=True)
    from bbct.golden.atomic import write_json

    write_json(path, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
