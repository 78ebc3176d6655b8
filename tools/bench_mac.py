"""What each MAC architecture would cost bbct on this machine, per linear shape.

Usage (prints a table and writes JSON, default ``bench/results/mac.json``)::

    python3 tools/bench_mac.py [--block 32] [--repeats 5] [--json PATH]

bbct's linears use the *aligned* MAC (docs/KERNELS.md, ``align`` and ``gemm``): activation
blocks aligned to one exponent per row, weights to one per matrix, then one exact float64
GEMM of the integers (operands up to 12 and 20 bits: float32 would not be exact). A
*block_dot* MAC (MX-style: exact per-block dot products of the narrow codes, then partial
sums aligned by their block exponents) maps onto float32 GEMMs, exact per block of K
(``127 * 127 * 32 < 2**24``), but each block is its own product and every output gathers
``K / block`` partial sums. Both are timed here on random 8-bit codes of the RT classifier's
linear shapes (batch 32 x 64 tokens):

* ``aligned_f64``: one float64 GEMM, what bbct runs;
* ``block_dot_parts``: the per-block float32 GEMMs alone (activations stored per block);
* ``block_dot``: those plus one plain Numba pass that combines the ``K / block`` partials of
  every output (each shifted left by its two exponents and added in int64; a real kernel
  also rounds the partials it shifts right, so it does at least this much);
* ``float32``: one float32 GEMM of the same shape (what a float engine runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numba as nb
import numpy as np
from bench_simulator import _time  # tools/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384))  # RT classifier: q/k/v/out, ffn1, ffn2


@nb.njit(cache=True)
def _combine(p, ea, ew, out):
    nblk, m_, n_ = p.shape
    for m in range(m_):
        for c in range(nblk):
            for n in range(n_):
                out[m, n] += np.int64(p[c, m, n]) << (ea[m, c] + ew[c, n])


def measure(m: int, k: int, n: int, block: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    nblk = k // block
    a = rng.integers(-127, 128, (m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (k, n)).astype(np.float32)
    ea = rng.integers(0, 4, (m, nblk)).astype(np.int64)
    ew = rng.integers(0, 4, (nblk, n)).astype(np.int64)
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    parts = np.empty((nblk, m, n), np.float32)
    a_blk = np.ascontiguousarray(a.reshape(m, nblk, block).transpose(1, 0, 2))  # stored per block
    w_blk = np.ascontiguousarray(w.reshape(nblk, block, n))

    def block_parts() -> None:
        for c in range(nblk):
            np.matmul(a_blk[c], w_blk[c], out=parts[c])

    def block_dot() -> None:
        block_parts()
        _combine(parts, ea, ew, np.zeros((m, n), np.int64))

    row = {"m": m, "k": k, "n": n, "block": block}
    for name, fn in (
        ("aligned_f64", lambda: a64 @ w64),
        ("block_dot_parts", block_parts),
        ("block_dot", block_dot),
        ("float32", lambda: a @ w),
    ):
        ts = _time(fn, repeats)
        row[f"{name}_ms"] = 1e3 * statistics.median(ts)
        row[f"{name}_min_ms"] = 1e3 * min(ts)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "mac.json")
    args = ap.parse_args(argv)
    rows = [measure(m, k, n, args.block, args.repeats) for m, k, n in SHAPES]
    print(f"MAC architectures, median ms per product (blocks of {args.block}, load {os.getloadavg()[0]:.2f})")
    print(f"{'M x K x N':>20}  {'aligned f64':>11}  {'block_dot parts':>15}  {'block_dot':>9}  {'float32':>7}")
    for r in rows:
        shape = f"{r['m']} x {r['k']} x {r['n']}"
        print(
            f"{shape:>20}  {r['aligned_f64_ms']:11.1f}  {r['block_dot_parts_ms']:15.1f}  "
            f"{r['block_dot_ms']:9.1f}  {r['float32_ms']:7.1f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "loadavg": list(os.getloadavg()), "block": args.block}, indent=1))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
