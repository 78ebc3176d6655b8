"""Benchmark the integer simulator against onnxruntime on the prepared RT classifier.

Usage::

    python3 tools/bench_simulator.py [--model PATH] [--batch 32] [--seq 64] [--threads 2]
                                     [--repeats 5] [--configs w8a8 w4a8 mx-int8] [--json PATH]

Engines, all in the same run, on the same batch (real RT test sentences, padded to ``--seq``):

* ``ort-fp32``: onnxruntime on the float model, full graph optimisations;
* ``ort-int8-dynamic``: onnxruntime's own ``quantize_dynamic`` (int8 weights, per-tensor
  dynamic activations; LayerNorm, softmax and GELU stay in float);
* ``bbct-<config>``: the bit-accurate integer simulator (``Simulator.run``), Numba kernels.

Each engine runs in its own child process so its peak resident memory (``ru_maxrss``) is its
own: model load + setup + the timed runs. Time is the median wall time of ``--repeats`` runs
after one warm-up (JIT compilation and session creation excluded; Numba's on-disk cache makes
later setups fast). ``vs_ort_fp32`` is that median over ort-fp32's (target for bbct: <= 1.5).
The simulator rows also get a per-op time breakdown from one profiled run.

Prints a table and writes JSON (default ``bench/results/simulator.json``).
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


def child(engine: str, model: Path, batch: int, seq: int, threads: int, repeats: int) -> dict:
    """Run one engine and return its measurements (called in a fresh process)."""
    import numpy as np

    feeds = _feeds(model, batch, seq)
    t_setup = time.perf_counter()
    extra: dict = {}
    if engine.startswith("ort-"):
        path = model
        if engine == "ort-int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = Path(tempfile.mkdtemp(prefix="bbct-bench-")) / "model.int8.onnx"
            quantize_dynamic(str(model), str(tmp), weight_type=QuantType.QInt8)
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
        sim = Simulator(model, cfg, calib_texts=calib, threads=threads)

        def once():
            r = sim.run(feeds)
            role = "logits" if "logits" in r.outputs else "last_hidden_state"
            return r.outputs[role].dequantize()

    setup_s = time.perf_counter() - t_setup
    times = _time(once, repeats)
    logits = np.asarray(once())
    if engine.startswith("bbct-"):
        prof: dict[str, float] = {}
        sim.run(feeds, profile=prof)
        extra["profile_s"] = dict(sorted(prof.items(), key=lambda kv: -kv[1]))
    return {
        "engine": engine,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pred": logits.argmax(-1).tolist() if logits.ndim == 2 else None,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="ONNX classifier (default: the prepared RT one)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=["w8a8", "w4a8", "mx-int8"])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "simulator.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from bbct.golden.paths import default_model

        args.model = default_model()
    if args.child:
        res = child(args.child, args.model, args.batch, args.seq, args.threads, args.repeats)
        print(json.dumps(res))
        return 0

    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    engines = ["ort-fp32", "ort-int8-dynamic"] + [f"bbct-{c}" for c in args.configs]
    rows = []
    for eng in engines:
        cmd = [sys.executable, __file__, "--child", eng, "--model", str(args.model), "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        print(f"running {eng} ...", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            raise SystemExit(f"bench: engine {eng} failed (exit {p.returncode})")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = rows[0]["median_s"]
    for r in rows:
        r["vs_ort_fp32"] = r["median_s"] / base
        if r["pred"] is not None and rows[0]["pred"] is not None:
            same = sum(a == b for a, b in zip(r["pred"], rows[0]["pred"], strict=True))
            r["agreement_with_fp32"] = same / len(r["pred"])

    print(f"\nRT classifier {args.model.name}, batch {args.batch} x seq {args.seq}, {args.threads} threads")
    print(f"{'engine':<20}{'median ms':>11}{'min ms':>9}{'vs fp32':>9}{'peak MB':>9}{'setup s':>9}{'agree':>7}")
    for r in rows:
        agree = r.get("agreement_with_fp32")
        print(
            f"{r['engine']:<20}{1e3 * r['median_s']:>11.1f}{1e3 * r['min_s']:>9.1f}{r['vs_ort_fp32']:>8.2f}x"
            f"{r['peak_rss_mb']:>9.0f}{r['setup_s']:>9.1f}{'' if agree is None else f'{agree:.2f}':>7}"
        )
    for r in rows:
        if "profile_s" in r:
            tot = sum(r["profile_s"].values())
            parts = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in r["profile_s"].items())
            print(f"  {r['engine']} per op (ms, one run, {1e3 * tot:.0f} total): {parts}")
    for r in rows:
        r.pop("pred", None)
    out = {
        "model": str(args.model),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "target_vs_ort_fp32": 1.5,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
