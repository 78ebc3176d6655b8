"""Benchmark bbct's Numba kernels against their plain references at BERT-base sizes.

Usage::

    PYTHONPATH=. python3 tools/bench_kernels.py [--json PATH] [--repeats N] [--only NAME ...]

Prints a table and writes JSON (default ``bench/results/kernels.json``). Per case:

* ``kernel_s``: the Numba kernel's median wall time over ``--repeats`` runs, after one
  warm-up call (compilation excluded);
* ``ref_s``: the plain reference's time. When the full shape would take more than ~10 s the
  reference runs on a slice of the rows and the time is extrapolated linearly by element
  count (``ref_extrapolated: true``, ``ref_fraction`` the share that ran);
* ``speedup`` = ref_s / kernel_s (target: >= 20);
* ``float32_s`` and ``vs_float32`` where a float32 NumPy equivalent is meaningful (GEMM:
  target <= 3x ``np.matmul`` in float32 of the same shape).

The GEMM cases: s8 x s8 (the float32 BLAS path: ``P < 2**24``), and the simulator's own
operands (activations aligned with 4 guard bits, weights with 12: the float64 BLAS path).
Timings on a shared 2-core machine vary by tens of percent between runs.

Adding a kernel (GELU, softmax, LayerNorm, tanh, ...) is one entry in :func:`cases`::

    Case(
        name="gelu_poly 2048x1536",
        setup=lambda rng: (args_tuple,),          # inputs built once, outside the timing
        kernel=lambda args: gelu_poly(*args),
        ref=lambda args, frac: gelu_poly_ref(*slice_rows(args, frac)),  # runs on a fraction
        elements=2048 * 1536,
        float32=lambda args: np.tanh(x32),        # optional
    )

``ref`` receives the fraction of rows to run (1.0 = all); ``slice_rows`` helps cut the row
axis of every array argument. The harness picks the fraction from a small probe run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bbct.kernels.add import add, add_ref  # noqa: E402
from bbct.kernels.align import align, align_ref  # noqa: E402
from bbct.kernels.embedding import embedding, embedding_ref  # noqa: E402
from bbct.kernels.formats import IntFormat, QTensor, Rounding  # noqa: E402
from bbct.kernels.gemm import gemm, gemm_ref  # noqa: E402
from bbct.kernels.quantize import quantize, quantize_ref  # noqa: E402
from bbct.kernels.requantize import requantize, requantize_mult, requantize_mult_ref, requantize_ref  # noqa: E402

REF_BUDGET_S = 10.0
TOKENS, HIDDEN, FFN, BLOCK = 2048, 384, 1536, 32


@dataclass
class Case:
    name: str
    setup: Callable[[np.random.Generator], Any]
    kernel: Callable[[Any], Any]
    ref: Callable[[Any, float], Any]
    elements: int
    float32: Callable[[Any], Any] | None = None


def slice_rows(args: tuple, frac: float) -> tuple:
    """Cut the first axis of every ndarray / QTensor argument to ``frac`` of its length."""
    out = []
    for a in args:
        if isinstance(a, QTensor):
            n = max(1, int(round(a.shape[0] * frac)))
            exp = a.exp[:n] if a.exp.shape[0] == a.shape[0] else a.exp
            out.append(QTensor(a.data[:n], a.fmt, exp, None if a.mant is None else a.mant[:n]))
        elif isinstance(a, np.ndarray) and a.ndim >= 2:
            out.append(a[: max(1, int(round(a.shape[0] * frac)))])
        else:
            out.append(a)
    return tuple(out)


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _median(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: compilation and caches
    return statistics.median(_timed(fn) for _ in range(repeats))


def cases() -> list[Case]:
    fmt8 = IntFormat(bits=8, block_size=BLOCK)
    fmt_acc = IntFormat(bits=8, block_size=BLOCK)

    def act(rng: np.random.Generator, cols: int) -> QTensor:
        return quantize(rng.normal(size=(TOKENS, cols)), fmt8)

    def weight(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # as lowering stores it: s8 blocks of 32 along K, aligned to one exponent, 12 guard bits
        wq = quantize(rng.normal(size=(HIDDEN, FFN)) * 0.05, IntFormat(bits=8, block_axis=0, block_size=BLOCK))
        return align(wq, (0, 1), 12, Rounding.RND_CONV)

    def gemm_setup(rng):
        x = act(rng, HIDDEN)
        a, ea = align(x, (-1,), 4, Rounding.RND_CONV)  # activations: 4 guard bits
        w, ew = weight(rng)
        bias = rng.integers(-(1 << 20), 1 << 20, FFN).astype(np.int64)
        return a, ea, w, ew.reshape(()), bias, x

    def gemm8_setup(rng):
        a = rng.integers(-128, 128, (TOKENS, HIDDEN)).astype(np.int64)
        w = rng.integers(-128, 128, (HIDDEN, FFN)).astype(np.int64)
        return a, np.zeros((TOKENS, 1), np.int64), w, np.array(0)

    def gemm_f32(args):
        a, _, w, *_ = args
        a32, w32 = a.astype(np.float32), w.astype(np.float32)
        return lambda: np.matmul(a32, w32)

    def path_setup(rng):
        return (act(rng, HIDDEN), *weight(rng))

    def path_kernel(args):
        x, w, ew = args
        a, ea = align(x, (-1,), 4, Rounding.RND_CONV)
        acc, e, _ = gemm(a, ea, w, ew.reshape(()), 40)
        return requantize(acc, e, fmt8)

    def path_ref(args, frac):
        x, w, ew = slice_rows(args[:1], frac)[0], args[1], args[2]
        a, ea = align_ref(x, (-1,), 4, Rounding.RND_CONV)
        acc, e, _ = gemm_ref(a, ea, w, ew.reshape(()), 40)
        return requantize_ref(acc, e, fmt8)

    def path_f32(args):
        x, w, _ = args
        x32, w32 = x.dequantize().astype(np.float32), w.astype(np.float32)
        return lambda: np.matmul(x32, w32)

    def acc_setup(rng):
        return rng.integers(-(1 << 24), 1 << 24, (TOKENS, FFN)).astype(np.int64), np.full((TOKENS, 1), -12)

    def add_setup(rng):
        return act(rng, HIDDEN), act(rng, HIDDEN)

    def emb_setup(rng):
        table = quantize(rng.normal(size=(30522, HIDDEN)), fmt8)
        return table, rng.integers(0, 30522, (16, 128))

    def emb_ref(args, frac):
        table, ids = args
        return embedding_ref(table, ids[: max(1, int(round(ids.shape[0] * frac)))])

    return [
        Case(
            f"quantize {TOKENS}x{HIDDEN} b{BLOCK}",
            lambda rng: (rng.normal(size=(TOKENS, HIDDEN)),),
            lambda args: quantize(args[0], fmt8),
            lambda args, f: quantize_ref(*slice_rows(args, f), fmt8),
            TOKENS * HIDDEN,
        ),
        Case(
            f"requantize dyn {TOKENS}x{FFN} b{BLOCK}",
            acc_setup,
            lambda args: requantize(*args, fmt_acc),
            lambda args, f: requantize_ref(*slice_rows(args, f), fmt_acc),
            TOKENS * FFN,
        ),
        Case(
            f"requantize static {TOKENS}x{FFN}",
            acc_setup,
            lambda args: requantize(*args, fmt_acc, np.full((1, FFN // BLOCK), 2, np.int32)),
            lambda args, f: requantize_ref(*slice_rows(args, f), fmt_acc, np.full((1, FFN // BLOCK), 2, np.int32)),
            TOKENS * FFN,
        ),
        Case(
            f"requantize_mult {TOKENS}x{FFN}",
            acc_setup,
            lambda args: requantize_mult(args[0], 23170, 25, 8),
            lambda args, f: requantize_mult_ref(slice_rows(args, f)[0], 23170, 25, 8),
            TOKENS * FFN,
        ),
        Case(
            f"align {TOKENS}x{HIDDEN} b{BLOCK} g4",
            lambda rng: (act(rng, HIDDEN),),
            lambda args: align(args[0], (-1,), 4, Rounding.RND_CONV),
            lambda args, f: align_ref(slice_rows(args, f)[0], (-1,), 4, Rounding.RND_CONV),
            TOKENS * HIDDEN,
        ),
        Case(
            f"gemm s8xs8 ({TOKENS}x{HIDDEN})x({HIDDEN}x{FFN})",
            gemm8_setup,
            lambda args: gemm(*args, 32),
            lambda args, f: gemm_ref(*slice_rows(args[:2], f), *args[2:], 32),
            TOKENS * HIDDEN * FFN,
            gemm_f32,
        ),
        Case(
            f"gemm aligned g4/g12 ({TOKENS}x{HIDDEN})x({HIDDEN}x{FFN}) +bias",
            gemm_setup,
            lambda args: gemm(args[0], args[1], args[2], args[3], 40, bias=args[4], e_bias=-20),
            lambda args, f: gemm_ref(*slice_rows(args[:2], f), args[2], args[3], 40, bias=args[4], e_bias=-20),
            TOKENS * HIDDEN * FFN,
            gemm_f32,
        ),
        Case(
            f"align+gemm+requantize ({TOKENS}x{HIDDEN})x({HIDDEN}x{FFN})",
            path_setup,
            path_kernel,
            path_ref,
            TOKENS * HIDDEN * FFN,
            path_f32,
        ),
        Case(
            f"add {TOKENS}x{HIDDEN} b{BLOCK}",
            add_setup,
            lambda args: add(*args, fmt8),
            lambda args, f: add_ref(*slice_rows(args, f), fmt8),
            TOKENS * HIDDEN,
        ),
        Case(
            f"embedding 16x128 ids, 30522x{HIDDEN}",
            emb_setup,
            lambda args: embedding(*args),
            emb_ref,
            16 * 128 * HIDDEN,
        ),
    ] + nonlinear_cases()


def nonlinear_cases() -> list[Case]:
    """GELU (both methods) at 2048x1536, softmax (both) over (32*12*64) rows of 64, LayerNorm
    at 2048x384, tanh at 2048x384: 16-bit inputs at the exponents the simulator picks."""
    from bbct.kernels.gelu import gelu_lut, gelu_lut_ref, gelu_poly, gelu_poly_ref, make_gelu_lut, make_gelu_poly
    from bbct.kernels.layernorm import layernorm, layernorm_ref, make_layernorm_params
    from bbct.kernels.softmax import make_softmax_params, softmax, softmax_ref
    from bbct.kernels.tanh import make_tanh_lut, tanh_lut, tanh_lut_ref

    gp, gl = make_gelu_poly(-11), make_gelu_lut(-11, 16, 8, 16)
    sp, sl = make_softmax_params(-9, 16, 8, "poly"), make_softmax_params(-9, 16, 8, "lut")
    g = np.random.default_rng(1)
    lp = make_layernorm_params(g.normal(1, 0.3, HIDDEN), g.normal(0, 0.2, HIDDEN), 1e-12)
    tp = make_tanh_lut(-12, 16, 10, 16)
    rows_sm = 32 * 12 * 64

    def int16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.clip(np.round(rng.normal(size=shape) * 4096), -32768, 32767).astype(np.int64)

    def sm_setup(rng: np.random.Generator) -> tuple:
        m = np.where(rng.random((rows_sm, 1)) < 0.9, 0, -(1 << 20)) * (np.arange(64) >= 48)
        return int16(rng, (rows_sm, 64)), m

    def ln_setup(rng: np.random.Generator) -> tuple:
        return np.round(rng.normal(size=(TOKENS, HIDDEN)) * 2**18).astype(np.int64), np.full((TOKENS, 1), -16)

    def gelu_in(rng: np.random.Generator) -> tuple:
        return (int16(rng, (TOKENS, FFN)),)

    def tanh_in(rng: np.random.Generator) -> tuple:
        return (int16(rng, (TOKENS, HIDDEN)),)

    return [
        Case(
            f"gelu_poly {TOKENS}x{FFN}",
            gelu_in,
            lambda a: gelu_poly(a[0], gp),
            lambda a, f: gelu_poly_ref(slice_rows(a, f)[0], gp),
            TOKENS * FFN,
        ),
        Case(
            f"gelu_lut a8 {TOKENS}x{FFN}",
            gelu_in,
            lambda a: gelu_lut(a[0], gl),
            lambda a, f: gelu_lut_ref(slice_rows(a, f)[0], gl),
            TOKENS * FFN,
        ),
        Case(
            f"softmax poly {rows_sm}x64",
            sm_setup,
            lambda a: softmax(*a, sp),
            lambda a, f: softmax_ref(*slice_rows(a, f), sp),
            rows_sm * 64,
        ),
        Case(
            f"softmax lut {rows_sm}x64",
            sm_setup,
            lambda a: softmax(*a, sl),
            lambda a, f: softmax_ref(*slice_rows(a, f), sl),
            rows_sm * 64,
        ),
        Case(
            f"layernorm {TOKENS}x{HIDDEN}",
            ln_setup,
            lambda a: layernorm(*a, lp),
            lambda a, f: layernorm_ref(*slice_rows(a, f), lp),
            TOKENS * HIDDEN,
        ),
        Case(
            f"tanh_lut a10 {TOKENS}x{HIDDEN}",
            tanh_in,
            lambda a: tanh_lut(a[0], tp),
            lambda a, f: tanh_lut_ref(slice_rows(a, f)[0], tp),
            TOKENS * HIDDEN,
        ),
    ]


def run(case: Case, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    args = case.setup(rng)
    t_kernel = _median(lambda: case.kernel(args), repeats)
    probe_frac = 1 / 256
    t_probe = max(_timed(lambda: case.ref(args, probe_frac)), 1e-6)
    frac = min(1.0, max(probe_frac, REF_BUDGET_S / (t_probe / probe_frac)))
    frac = 1.0 if frac > 0.5 else frac
    t_ref = _timed(lambda: case.ref(args, frac)) / frac
    row: dict[str, Any] = {
        "name": case.name,
        "elements": case.elements,
        "kernel_s": t_kernel,
        "ref_s": t_ref,
        "ref_extrapolated": frac < 1.0,
        "ref_fraction": frac,
        "speedup": t_ref / t_kernel,
    }
    if case.float32 is not None:
        f = case.float32(args)
        t32 = _median(f, repeats)
        row["float32_s"] = t32
        row["vs_float32"] = t_kernel / t32
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="bench/results/kernels.json", help="where to write the results")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per kernel (median)")
    p.add_argument("--only", nargs="*", help="run only cases whose name starts with one of these")
    ns = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'case':52} {'kernel':>10} {'reference':>12} {'speedup':>9} {'float32':>9} {'vs f32':>7}")
    for case in cases():
        if ns.only and not any(case.name.startswith(o) for o in ns.only):
            continue
        r = run(case, ns.repeats, rng)
        rows.append(r)
        ref = f"{r['ref_s']:.3g}s" + ("*" if r["ref_extrapolated"] else " ")
        f32 = f"{r['float32_s'] * 1e3:.1f}ms" if "float32_s" in r else ""
        vs = f"{r['vs_float32']:.2f}x" if "vs_float32" in r else ""
        line = f"{r['name']:52} {r['kernel_s'] * 1e3:8.1f}ms {ref:>12} {r['speedup']:8.0f}x"
        print(f"{line} {f32:>9} {vs:>7}", flush=True)
    print("* reference run on a slice of the rows and extrapolated linearly by element count")
    out = Path(ns.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
