"""Directed (corner) and random stimulus per kernel, for an RTL testbench, with corner coverage.

``bbct vectors --kernel K --stimulus corner|random`` writes one folder per run:

* ``<port>.hex`` — one file per DUT port: two's complement (signed ports) or plain binary
  (unsigned ports) hexadecimal at the port's width, one value per line (``$readmemh``).
  A port of ``lanes`` values per transaction holds ``count * lanes`` lines, transaction by
  transaction, lane 0 first; on the DUT the lanes are packed into one bus, lane ``i`` at
  bits ``[i*bits +: bits]``.
* ``stimulus.json`` — kernel, stimulus kind, seed, count, every port (direction, width,
  signedness, lanes, file, sha256, meaning), the HDL parameters the DUT is built with, and
  the coverage table. Written last: a folder without it is not a valid vector set.

Transaction ``i`` drives every ``in`` port with its ``i``-th value(s); the ``out`` ports must
then show theirs. The expected outputs come from bbct's own kernels (``kernels/*.py``), one
kernel call per transaction.

Coverage is measured, not assumed: after the expected outputs are computed, each kernel's
``inspect`` looks at the values a transaction really carries (the bits a shift drops, the
value before narrowing, the exponents an operand really has) and counts the corner bins it
hits. A bin with 0 hits is flagged in the summary. Corner stimulus is built to hit every bin
of its kernel (``tests/test_stimulus.py`` checks that it does); random stimulus reports the
same bins, which shows how rarely random values reach a corner.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.atomic import write_text
from bbct.golden.errors import BbctError
from bbct.kernels.formats import (
    EXP_ZERO,
    IntFormat,
    QTensor,
    Rounding,
    Saturation,
    bit_length_ref,
    int_range,
    saturate_ref,
    shift_round_ref,
)

MANIFEST = "stimulus.json"
KINDS = ("corner", "random")


@dataclass(frozen=True)
class Port:
    """One DUT port: ``lanes`` values of ``bits`` each per transaction (lane 0 at the LSBs)."""

    name: str
    direction: str  # "in" | "out"
    bits: int
    signed: bool
    lanes: int = 1
    doc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "direction": self.direction,
            "bits": self.bits,
            "signed": self.signed,
            "lanes": self.lanes,
            "bus_bits": self.bits * self.lanes,
            "doc": self.doc,
        }


Case = dict[str, list[int]]  # port name -> lane values of one transaction


@dataclass
class Stimulus:
    """A generated vector set: transactions (inputs and expected outputs) and their coverage."""

    kernel: str
    kind: str
    seed: int
    ports: list[Port]
    cases: list[Case]
    coverage: dict[str, int]
    hdl_parameters: dict[str, int] = field(default_factory=dict)

    def column(self, port: Port) -> np.ndarray:
        """The port's values, ``(count, lanes)`` int64."""
        return np.array([c[port.name] for c in self.cases], dtype=np.int64).reshape(len(self.cases), port.lanes)


@dataclass(frozen=True)
class KernelStimulus:
    """A kernel's stimulus generator: its ports, its corner set, random cases, the expected
    outputs (from bbct's kernel) and the coverage inspection of one transaction."""

    name: str
    describes: str
    ports: tuple[Port, ...]
    bins: tuple[str, ...]
    corner: Callable[[np.random.Generator], list[Case]]
    random: Callable[[np.random.Generator], Case]
    expect: Callable[[Case], Case]
    inspect: Callable[[Case], Counter]
    hdl_parameters: dict[str, int] = field(default_factory=dict)


KERNELS: dict[str, KernelStimulus] = {}


def register(k: KernelStimulus) -> KernelStimulus:
    if k.name in KERNELS:
        raise ValueError(f"stimulus for kernel {k.name!r} registered twice")
    KERNELS[k.name] = k
    return k


def kernel_stimulus(name: str) -> KernelStimulus:
    if name not in KERNELS:
        raise BbctError(f"--kernel {name}: no stimulus for it; kernels with stimulus: {', '.join(KERNELS)}")
    return KERNELS[name]


def generate(kernel: str, kind: str = "corner", count: int = 0, seed: int = 0) -> Stimulus:
    """Inputs, expected outputs and measured coverage for ``kernel``.

    ``corner``: the kernel's directed set, padded with random transactions up to ``count``;
    ``random``: ``count`` random transactions. Same ``seed``, same vectors.
    """
    k = kernel_stimulus(kernel)
    if kind not in KINDS:
        raise BbctError(f"--stimulus {kind}: expected one of {', '.join(KINDS)}")
    if count < 0:
        raise BbctError(f"--count {count}: must be >= 0")
    rng = np.random.default_rng(seed)
    cases = list(k.corner(rng)) if kind == "corner" else []
    while len(cases) < count:
        cases.append(k.random(rng))
    if not cases:
        raise BbctError("--count 0 with --stimulus random writes no vectors: give --count N")
    full = []
    hits: Counter = Counter()
    for c in cases:
        c = {**c, **k.expect(c)}
        hits.update(k.inspect(c))
        full.append(c)
    unknown = set(hits) - set(k.bins)
    if unknown:  # a bin the inspection counts must be declared, so the table shows every one
        raise AssertionError(f"{kernel}: undeclared coverage bins {sorted(unknown)}")
    coverage = {b: int(hits.get(b, 0)) for b in k.bins}
    return Stimulus(kernel, kind, seed, list(k.ports), full, coverage, dict(k.hdl_parameters))


def hex_lines(values: np.ndarray, bits: int) -> str:
    """``values`` as ``bits``-wide hex (two's complement for negatives), one per line."""
    digits = max(1, -(-bits // 4))
    mask = (1 << bits) - 1
    return "".join(f"{int(v) & mask:0{digits}x}\n" for v in np.asarray(values).ravel())


def write_stimulus(st: Stimulus, out_dir: str | Path) -> Path:
    """Write one ``<port>.hex`` per port and ``stimulus.json`` (last); returns the manifest path."""
    from bbct.golden.provenance import provenance

    out = Path(out_dir)
    manifest = out / MANIFEST
    stale = _listed(manifest)
    if manifest.exists():  # the old manifest goes first: a killed write leaves no valid folder
        manifest.unlink()
    ports = []
    for p in st.ports:
        col = st.column(p)
        lo, hi = int_range(p.bits, p.signed)
        if col.size and (int(col.min()) < lo or int(col.max()) > hi):
            raise AssertionError(f"{st.kernel}: port {p.name} value outside its {p.bits}-bit range")
        path = write_text(out / f"{p.name}.hex", hex_lines(col, p.bits))
        ports.append({**p.to_dict(), "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    doc = {
        "kernel": st.kernel,
        "describes": KERNELS[st.kernel].describes if st.kernel in KERNELS else "",
        "stimulus": st.kind,
        "seed": st.seed,
        "count": len(st.cases),
        "ports": ports,
        "hdl_parameters": st.hdl_parameters,
        "coverage": st.coverage,
        "provenance": provenance(),
        "conventions": {
            "hex": "one value per line at the port's 'bits': two's complement if 'signed', else "
            "plain binary; count * lanes lines, transaction by transaction, lane 0 first",
            "bus": "a port of several lanes is one bus of bus_bits, lane i at bits [i*bits +: bits]",
            "transaction": "drive every 'in' port with transaction i's values; the 'out' ports must show theirs",
        },
    }
    path = write_text(manifest, json.dumps(doc, indent=1) + "\n")
    for name in stale - {p["file"] for p in ports}:  # files of an earlier set this one did not rewrite
        (out / name).unlink(missing_ok=True)
    return path


def _listed(manifest: Path) -> set[str]:
    """Port files an earlier ``stimulus.json`` in the folder lists (plain names only)."""
    try:
        ports = json.loads(manifest.read_text()).get("ports", [])
        return {p["file"] for p in ports if Path(str(p.get("file", ""))).name == p["file"]}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return set()


def coverage_table(st: Stimulus) -> str:
    """The coverage summary: hits per bin, bins with 0 hits flagged."""
    width = max(len(b) for b in st.coverage)
    lines = [f"coverage of {st.kernel} ({st.kind}, {len(st.cases)} transactions, seed {st.seed}):"]
    for b, n in st.coverage.items():
        lines.append(f"  {b:<{width}} {n:>6}{'  <-- not hit' if n == 0 else ''}")
    missed = sum(1 for n in st.coverage.values() if n == 0)
    flag = f", {missed} NOT HIT" if missed else ""
    lines.append(f"  {len(st.coverage) - missed} of {len(st.coverage)} bins hit{flag}")
    return "\n".join(lines)


# -- shared inspection helpers --------------------------------------------------------------------
ROUNDINGS = tuple(Rounding)
SATURATIONS = tuple(Saturation)


def _tie(v: int, s: int) -> bool:
    """``v >> s`` (s > 0) drops exactly half an output step: the midpoint every RND* mode decides."""
    return s > 0 and (v & ((1 << s) - 1)) == 1 << (s - 1)


def _tie_bin(prefix: str, v: int, s: int, mode: int) -> str:
    """``prefix.tie.MODE.pos|neg.even|odd``: the sign of the value and the parity of its floor
    tell the modes apart (RND_CONV rounds an even floor down, RND up; RND_ZERO and RND_INF
    split on the sign)."""
    sign = "neg" if v < 0 else "pos"
    parity = "odd" if (v >> s) & 1 else "even"
    return f"{prefix}.tie.{Rounding(mode).name}.{sign}.{parity}"


def _tie_bins(prefix: str) -> list[str]:
    return [f"{prefix}.tie.{r.name}.{s}.{p}" for r in ROUNDINGS for s in ("pos", "neg") for p in ("even", "odd")]


def _narrow_bin(prefix: str, v: int, bits: int, mode: int) -> str | None:
    """``prefix.sat.MODE.hi|lo`` when narrowing ``v`` to signed ``bits`` with ``mode`` changes it."""
    y, over = saturate_ref(v, bits, True, mode)
    if not over:
        return None
    return f"{prefix}.sat.{Saturation(mode).name}.{'hi' if v > 0 else 'lo'}"


def _sat_bins(prefix: str) -> list[str]:
    return [f"{prefix}.sat.{m.name}.{d}" for m in SATURATIONS for d in ("hi", "lo")]


def _rand_mag(rng: np.random.Generator, max_bits: int) -> int:
    """A signed integer with a random bit length up to ``max_bits`` (small and large alike)."""
    b = int(rng.integers(0, max_bits + 1))
    v = int(rng.integers(0, 1 << b)) if b else 0
    return -v if rng.integers(2) else v


# -- requantize: one element, static shift ----------------------------------------------------------
RQ_OUT = 8  # output width of the requantize unit's vectors (HDL parameter OUT_BITS)


def _rq_case(x: int, shift: int, rnd: int, sat: int) -> Case:
    return {"x": [x], "shift": [shift], "rnd": [int(rnd)], "sat": [int(sat)]}


def _rq_corner(rng: np.random.Generator) -> list[Case]:
    hi = (1 << (RQ_OUT - 1)) - 1
    cases = []
    for r in ROUNDINGS:
        for s in SATURATIONS:
            for sh in (1, 3, 9):  # ties: floor q even/odd, positive/negative
                for q in (2, 3, -4, -3):
                    cases.append(_rq_case(q * (1 << sh) + (1 << (sh - 1)), sh, r, s))
            for x in (hi + 1, 5000, -(hi + 2), -5000):  # both bounds, just beyond and far beyond
                cases.append(_rq_case(x << 4, 4, r, s))
            cases.append(_rq_case(-(hi + 1) << 2, 2, r, s))  # the code SAT_SYM alone refuses
            cases.append(_rq_case(hi << 2, 2, r, s))  # exactly the bounds: no event
            cases.append(_rq_case(-(hi + 1), 0, r, s))
            cases.append(_rq_case((1 << 61) + 12345, 70, r, s))  # right shift beyond 62: taken as 62
            cases.append(_rq_case(-((1 << 61) + 1), 62, r, s))
            cases.append(_rq_case(-5, -3, r, s))  # exact left shift
            cases.append(_rq_case(3 << 40, -30, r, s))  # left shift beyond 62 bits
            cases.append(_rq_case(-(1 << 45), -40, r, s))
            cases.append(_rq_case(0, 5, r, s))
    return cases


def _rq_random(rng: np.random.Generator) -> Case:
    sh = int(rng.integers(-12, 30)) if rng.random() < 0.9 else int(rng.integers(-70, 71))
    return _rq_case(_rand_mag(rng, 61), sh, int(rng.integers(6)), int(rng.integers(3)))


def _rq_expect(c: Case) -> Case:
    from bbct.kernels.requantize import requantize

    fmt = IntFormat(bits=RQ_OUT, signed=True, block_size=1, rounding=c["rnd"][0], saturation=c["sat"][0])
    q = requantize(np.array([c["x"][0]], np.int64), np.zeros(1, np.int32), fmt, np.array([c["shift"][0]]))
    return {"y": [int(q.data[0])], "ovf": [int(q.meta["overflow"])]}


def _rq_inspect(c: Case) -> Counter:
    x, sh, r, s = c["x"][0], c["shift"][0], c["rnd"][0], c["sat"][0]
    hits: Counter = Counter()
    eff = min(sh, 62)
    if _tie(x, eff):
        hits[_tie_bin("shift", x, eff, r)] += 1
    pre = shift_round_ref(x, eff, r)  # the exact value before narrowing
    if (b := _narrow_bin("out", pre, RQ_OUT, s)) is not None:
        hits[b] += 1
    lo, hi = int_range(RQ_OUT, True)
    if pre == lo and s == Saturation.SAT_SYM:
        hits["out.sat_sym_refuses_min_code"] += 1
    if c["y"][0] in (lo, hi) and not c["ovf"][0]:
        hits["out.exact_bound"] += 1
    if sh > 62:
        hits["shift.right_beyond_62"] += 1
    if sh < 0 and x and bit_length_ref(x) - sh > 62:
        hits["shift.left_beyond_62_bits"] += 1
    elif sh < 0 and x:
        hits["shift.left_exact"] += 1
    if x == 0:
        hits["x.zero"] += 1
    return hits


register(
    KernelStimulus(
        name="requantize",
        describes="static requantize of one element: y = sat(x >>r shift) to signed OUT_BITS "
        "(docs/KERNELS.md, requantize, static); rnd and sat select the modes per transaction",
        ports=(
            Port("x", "in", 64, True, doc="input value x (|x| < 2**62) at e_in"),
            Port("shift", "in", 8, True, doc="exp_out - e_in: > 0 right shift, < 0 left shift"),
            Port("rnd", "in", 3, False, doc="rounding mode: " + ", ".join(f"{r.value}={r.name}" for r in Rounding)),
            Port("sat", "in", 2, False, doc="saturation mode: " + ", ".join(f"{m.value}={m.name}" for m in Saturation)),
            Port("y", "out", RQ_OUT, True, doc="output code at exp_out"),
            Port("ovf", "out", 1, False, doc="1 when narrowing changed the value (one saturation event)"),
        ),
        bins=tuple(
            _tie_bins("shift")
            + _sat_bins("out")
            + [
                "out.sat_sym_refuses_min_code",
                "out.exact_bound",
                "shift.right_beyond_62",
                "shift.left_beyond_62_bits",
                "shift.left_exact",
                "x.zero",
            ]
        ),
        corner=_rq_corner,
        random=_rq_random,
        expect=_rq_expect,
        inspect=_rq_inspect,
        hdl_parameters={"OUT_BITS": RQ_OUT},
    )
)


# -- block-scaled dot product: align both operands, MAC with a narrow accumulator, bias -------------
DOT_K, DOT_BS = 10, 4  # 10 = 4 + 4 + 2: the last block is partial
DOT_NB = -(-DOT_K // DOT_BS)
DOT_ACC_W = 48  # the acc port; acc_bits (2..48) selects the accumulator width per transaction
GUARD_MAX = 8


def _blocks_of(codes: list[int]) -> list[list[int]]:
    return [codes[i : i + DOT_BS] for i in range(0, DOT_K, DOT_BS)]


def _zero_exps(codes: list[int], exps: list[int]) -> list[int]:
    """An all-zero block has exponent EXP_ZERO (the format's convention)."""
    return [EXP_ZERO if not any(blk) else e for blk, e in zip(_blocks_of(codes), exps, strict=True)]


def _align_one(codes: list[int], exps: list[int], guard: int, rnd: int, axis: int) -> tuple[np.ndarray, int]:
    """bbct's align of one operand of the tile: a row (axis -1) or a column (axis 0)."""
    from bbct.kernels.align import align

    fmt = IntFormat(bits=8, signed=True, block_axis=axis, block_size=DOT_BS)
    shape, eshape = ((1, DOT_K), (1, DOT_NB)) if axis == -1 else ((DOT_K, 1), (DOT_NB, 1))
    q = QTensor(np.array(codes, np.int8).reshape(shape), fmt, np.array(exps, np.int32).reshape(eshape))
    wide, e_ref = align(q, (axis,), guard, Rounding(rnd))
    return wide, int(e_ref.ravel()[0])


def _aligned_ref(codes: list[int], exps: list[int], guard: int, rnd: int) -> tuple[list[int], list[int], int]:
    """The spec's align, step by step, for inspection: (values, shifts, e_ref)."""
    e_ref = max(exps) - guard
    shifts = [min(62, e_ref - exps[i // DOT_BS]) for i in range(DOT_K)]
    return [shift_round_ref(v, s, rnd) for v, s in zip(codes, shifts, strict=True)], shifts, e_ref


def _dot_case(
    a,
    ea,
    b,
    eb,
    guard=1,
    arnd=Rounding.RND_CONV,
    acc_bits=32,
    sat=Saturation.SAT,
    bias=None,
    e_bias=0,
    brnd=Rounding.RND_CONV,
) -> Case:
    return {
        "a": list(a),
        "ea": _zero_exps(list(a), list(ea)),
        "b": list(b),
        "eb": _zero_exps(list(b), list(eb)),
        "guard": [guard],
        "align_rnd": [int(arnd)],
        "acc_bits": [acc_bits],
        "acc_sat": [int(sat)],
        "bias": [0 if bias is None else bias],
        "e_bias": [e_bias],
        "bias_en": [int(bias is not None)],
        "bias_rnd": [int(brnd)],
    }


def _dot_corner(rng: np.random.Generator) -> list[Case]:
    cases = []
    ones = [1] * DOT_K
    for r in ROUNDINGS:
        for q in (2, 3, -4, -3):
            for g in (0, 2):
                # a's block 1 sits 3 + g steps below block 0: shifted right by 3, value q*8 + 4 is a tie;
                # the bias sits 2 steps above the accumulator: q*4 + 2 is a tie too
                a = [5, 0, 0, 0, q * 8 + 4, 0, 0, 0, 1, -1]
                cases.append(
                    _dot_case(a, [0, -3 - g, 0], ones, [0, 0, 0], g, r, 32, Saturation.SAT, q * 4 + 2, -2 * g - 2, r)
                )
                cases.append(_dot_case(ones, [0, 0, 0], a, [0, -3 - g, 0], g, r, 32, Saturation.SAT, None, 0, r))
    for s in SATURATIONS:
        for sign in (1, -1):
            big = [127] * DOT_K
            cases.append(_dot_case(big, [0, 0, 0], [sign * 127] * DOT_K, [0, 0, 0], 0, Rounding.RND_CONV, 12, s))
            # the exact sum is 0, the clipped running sum is not
            cases.append(
                _dot_case([100, -100] * 5, [0, 0, 0], [sign * 100] * DOT_K, [0, 0, 0], 0, Rounding.RND_CONV, 12, s)
            )
            # the bias pushes a fitting sum over a bound; a bias far above the accumulator
            cases.append(
                _dot_case(
                    [10] + [0] * 9, [0, 0, 0], [10] + [0] * 9, [0, 0, 0], 0, Rounding.RND_CONV, 8, s, sign * 100, 0
                )
            )
            cases.append(
                _dot_case([3] + [0] * 9, [0, 0, 0], [2] + [0] * 9, [0, 0, 0], 0, Rounding.RND_CONV, 32, s, sign * 5, 60)
            )
    zero = [0] * DOT_K
    for bits, bias in ((16, 1000), (8, 1000), (8, 1020), (8, -1020)):  # all-zero operand: the bias alone
        cases.append(_dot_case(zero, [0, 0, 0], ones, [0, 0, 0], 1, Rounding.RND_CONV, bits, Saturation.SAT, bias, -20))
        cases.append(
            _dot_case(
                ones, [0, 0, 0], zero, [0, 0, 0], 1, Rounding.RND, bits, Saturation.SAT_SYM, bias, -20, Rounding.RND
            )
        )
    cases.append(_dot_case(zero, [0, 0, 0], zero, [0, 0, 0], 3))  # no bias: 0
    # a block 70 steps below the largest: its shift is taken as 62
    cases.append(_dot_case([1, 2, 3, 4, -7, 7, 1, 0, 0, 0], [10, -60, 0], ones, [0, 0, 0], 0))
    return cases


def _dot_random(rng: np.random.Generator) -> Case:
    def operand() -> tuple[list[int], list[int]]:
        codes = [int(v) for v in rng.integers(-128, 128, DOT_K)]
        for blk in range(DOT_NB):
            if rng.random() < 0.1:
                codes[blk * DOT_BS : (blk + 1) * DOT_BS] = [0] * len(codes[blk * DOT_BS : (blk + 1) * DOT_BS])
        return codes, [int(e) for e in rng.integers(-20, 6, DOT_NB)]

    a, ea = operand()
    b, eb = operand()
    g = int(rng.integers(0, GUARD_MAX + 1))
    e_acc = max(ea) + max(eb) - 2 * g
    bias = int(rng.integers(-(1 << 20), 1 << 20)) if rng.random() < 0.7 else None
    return _dot_case(
        a,
        ea,
        b,
        eb,
        g,
        int(rng.integers(6)),
        int(rng.integers(8, DOT_ACC_W + 1)),
        int(rng.integers(3)),
        bias,
        e_acc + int(rng.integers(-30, 30)),
        int(rng.integers(6)),
    )


def _dot_expect(c: Case) -> Case:
    from bbct.kernels.gemm import gemm

    g, r = c["guard"][0], c["align_rnd"][0]
    wa, ea = _align_one(c["a"], c["ea"], g, r, -1)
    wb, eb = _align_one(c["b"], c["eb"], g, r, 0)
    bias = np.array(c["bias"], np.int64) if c["bias_en"][0] else None
    acc, e_acc, events = gemm(
        wa,
        np.array([[ea]]),
        wb,
        np.array([[eb]]),
        c["acc_bits"][0],
        Saturation(c["acc_sat"][0]),
        bias,
        c["e_bias"][0],
        Rounding(c["bias_rnd"][0]),
    )
    return {"acc": [int(acc[0, 0])], "e_acc": [int(e_acc[0, 0])], "events": [int(events)]}


def _operand_hits(c: Case, name: str) -> Counter:
    """Align corners of one operand: ties per mode, shifts beyond 62, guard shifts, zero and
    partial blocks, from the codes and exponents the transaction carries."""
    hits: Counter = Counter()
    g, r = c["guard"][0], c["align_rnd"][0]
    codes, exps = c[name], c["e" + name]
    _, shifts, _ = _aligned_ref(codes, exps, g, r)
    for i, (v, s) in enumerate(zip(codes, shifts, strict=True)):
        if v and _tie(v, s):
            hits[_tie_bin("align", v, s, r)] += 1
        if v and max(exps) - g - exps[i // DOT_BS] > 62:
            hits["align.right_beyond_62"] += 1
        if v and s < 0:
            hits["align.left_guard"] += 1
    blocks = _blocks_of(codes)
    if not any(codes):
        hits["operand.all_zero"] += 1
    elif not all(any(blk) for blk in blocks):
        hits["block.all_zero"] += 1
    if DOT_K % DOT_BS and any(blocks[-1]):
        hits["block.partial_last_nonzero"] += 1
    return hits


def _dot_inspect(c: Case) -> Counter:
    g, bits, sat = c["guard"][0], c["acc_bits"][0], c["acc_sat"][0]
    hits = _operand_hits(c, "a") + _operand_hits(c, "b")
    wide = [_aligned_ref(c[n], c["e" + n], g, c["align_rnd"][0])[0] for n in ("a", "b")]
    acc, n_mac = 0, 0
    exact = sum(x * y for x, y in zip(*wide, strict=True))
    for x, y in zip(*wide, strict=True):  # replay the accumulator: where does narrowing change the running sum?
        if (b := _narrow_bin("acc", acc + x * y, bits, sat)) is not None:
            hits[b] += 1
            n_mac += 1
        acc = saturate_ref(acc + x * y, bits, True, sat)[0]
    if n_mac >= 2:
        hits["acc.several_events"] += 1
    if n_mac and saturate_ref(exact, bits, True, sat)[0] != acc:
        hits["acc.differs_from_clipped_exact_sum"] += 1
    zero_row = not any(c["a"]) or not any(c["b"])
    if c["bias_en"][0]:
        bias, sb = c["bias"][0], min(62, c["e_acc"][0] - c["e_bias"][0])
        if bias and _tie(bias, sb):
            hits[_tie_bin("bias", bias, sb, c["bias_rnd"][0])] += 1
        if bias and sb < 0:
            hits["bias.left_shift"] += 1
            if abs(bias) << -sb >= 1 << 62:
                hits["bias.beyond_datapath"] += 1
        if c["events"][0] > n_mac:
            hits["bias.overflow"] += 1
        if zero_row:
            raised = bit_length_ref(bias) > bits - 1
            hits["zero_row.bias_exponent_raised" if raised else "zero_row.bias_fits"] += 1
    elif zero_row:
        hits["zero_row.no_bias"] += 1
    return hits


register(
    KernelStimulus(
        name="gemm",
        describes=f"block-scaled dot product tile: a and b ({DOT_K} s8 codes, blocks of {DOT_BS}, one exponent "
        "per block) aligned with guard bits (docs/KERNELS.md, align), multiplied and summed in order into an "
        "acc_bits accumulator narrowed after every add, plus an aligned bias (gemm); modes per transaction",
        ports=(
            Port("a", "in", 8, True, DOT_K, "row of a: s8 codes"),
            Port("ea", "in", 16, True, DOT_NB, "a's block exponents (EXP_ZERO = -1024 for an all-zero block)"),
            Port("b", "in", 8, True, DOT_K, "column of b: s8 codes"),
            Port("eb", "in", 16, True, DOT_NB, "b's block exponents"),
            Port("guard", "in", 4, False, doc=f"align guard bits, 0..{GUARD_MAX}"),
            Port("align_rnd", "in", 3, False, doc="rounding of align's right shifts"),
            Port("acc_bits", "in", 6, False, doc=f"accumulator width, 2..{DOT_ACC_W}"),
            Port("acc_sat", "in", 2, False, doc="accumulator narrowing: 0=SAT, 1=SAT_SYM, 2=WRAP"),
            Port("bias", "in", 32, True, doc="bias code"),
            Port("e_bias", "in", 16, True, doc="bias exponent"),
            Port("bias_en", "in", 1, False, doc="1: add the bias"),
            Port("bias_rnd", "in", 3, False, doc="rounding of the bias alignment"),
            Port("acc", "out", DOT_ACC_W, True, doc="accumulator (acc_bits wide, sign-extended)"),
            Port("e_acc", "out", 16, True, doc="accumulator exponent"),
            Port("events", "out", 8, False, doc="narrowings that changed a value"),
        ),
        bins=tuple(
            _tie_bins("align")
            + ["align.right_beyond_62", "align.left_guard", "operand.all_zero", "block.all_zero"]
            + ["block.partial_last_nonzero"]
            + _sat_bins("acc")
            + ["acc.several_events", "acc.differs_from_clipped_exact_sum"]
            + _tie_bins("bias")
            + ["bias.left_shift", "bias.beyond_datapath", "bias.overflow"]
            + ["zero_row.bias_exponent_raised", "zero_row.bias_fits", "zero_row.no_bias"]
        ),
        corner=_dot_corner,
        random=_dot_random,
        expect=_dot_expect,
        inspect=_dot_inspect,
        hdl_parameters={"K": DOT_K, "BS": DOT_BS, "NB": DOT_NB, "ACC_W": DOT_ACC_W},
    )
)


# -- requantize, dynamic: one block exponent per block from the block's largest magnitude --------------------
RQB_IN = 32


def _rqb_case(x, e_in=0, rnd=Rounding.RND_CONV, sat=Saturation.SAT) -> Case:
    return {"x": list(x), "e_in": [e_in], "rnd": [int(rnd)], "sat": [int(sat)]}


def _rqb_corner(rng: np.random.Generator) -> list[Case]:
    cases = []
    for r in ROUNDINGS:
        for s in SATURATIONS:
            # 508 sets s = 2: q*4 + 2 beside it is a tie; 255 is 127.5 at s = 1 (rounded up: s = 2);
            # 3 and 1 gain 5 bits (s = -5); the middle block is zero; the last block is short
            for q in (2, 3, -4, -3):
                cases.append(_rqb_case([508, q * 4 + 2, 0, 1, 255, -7, 0, 0, 3, 1], -4, r, s))
            cases.append(_rqb_case([-255, 0, 0, 0, 0, 0, 0, 0, -(1 << 30), 5], 7, r, s))
    return cases


def _rqb_random(rng: np.random.Generator) -> Case:
    x = [_rand_mag(rng, RQB_IN - 1) for _ in range(DOT_K)]
    if rng.random() < 0.2:
        blk = int(rng.integers(DOT_NB))
        x[blk * DOT_BS : (blk + 1) * DOT_BS] = [0] * len(x[blk * DOT_BS : (blk + 1) * DOT_BS])
    return _rqb_case(x, int(rng.integers(-30, 10)), int(rng.integers(6)), int(rng.integers(3)))


def _rqb_expect(c: Case) -> Case:
    from bbct.kernels.requantize import requantize

    fmt = IntFormat(bits=8, signed=True, block_size=DOT_BS, rounding=c["rnd"][0], saturation=c["sat"][0])
    q = requantize(np.array(c["x"], np.int64).reshape(1, DOT_K), np.array([[c["e_in"][0]]], np.int32), fmt)
    return {
        "y": [int(v) for v in q.data.ravel()],
        "e_out": [int(v) for v in np.ravel(q.exp)],
        "ovf": [q.meta["overflow"]],
    }


def _rqb_inspect(c: Case) -> Counter:
    hits: Counter = Counter()
    r, sat = c["rnd"][0], c["sat"][0]
    for blk, vals in enumerate(_blocks_of(c["x"])):
        if c["e_out"][blk] == EXP_ZERO:
            hits["block.all_zero"] += 1
            continue
        sh = c["e_out"][blk] - c["e_in"][0]  # the shift the block really got
        if sh > bit_length_ref(max(abs(v) for v in vals)) - 7:
            hits["shift.rounded_up_one_more"] += 1
        if sh < 0:
            hits["shift.left_gains_bits"] += 1
        if len(vals) < DOT_BS:
            hits["block.partial_last_nonzero"] += 1
        for v in vals:
            if v and _tie(v, sh):
                hits[_tie_bin("shift", v, sh, r)] += 1
            if (b := _narrow_bin("out", shift_round_ref(v, sh, r), 8, sat)) is not None:
                hits[b] += 1
    return hits


register(
    KernelStimulus(
        name="requantize_dynamic",
        describes=f"dynamic (MX-style) requantize of a row of {DOT_K} s{RQB_IN} values at e_in to s8 in blocks of "
        f"{DOT_BS}: s = bitlen(amax) - 7, one more if amax rounds past 127 (docs/KERNELS.md, requantize, dynamic)",
        ports=(
            Port("x", "in", RQB_IN, True, DOT_K, "input values at e_in"),
            Port("e_in", "in", 16, True, doc="the row's exponent"),
            Port("rnd", "in", 3, False, doc="rounding mode"),
            Port("sat", "in", 2, False, doc="saturation mode"),
            Port("y", "out", 8, True, DOT_K, "s8 codes"),
            Port("e_out", "out", 16, True, DOT_NB, "block exponents (EXP_ZERO: all-zero block)"),
            Port("ovf", "out", 8, False, doc="saturated elements"),
        ),
        bins=tuple(
            _tie_bins("shift")
            + ["shift.rounded_up_one_more", "shift.left_gains_bits", "out.sat.SAT_SYM.lo"]
            + ["block.all_zero", "block.partial_last_nonzero"]
        ),
        corner=_rqb_corner,
        random=_rqb_random,
        expect=_rqb_expect,
        inspect=_rqb_inspect,
        hdl_parameters={"K": DOT_K, "BS": DOT_BS, "NB": DOT_NB},
    )
)


# -- align alone: one group of block-scaled codes to one exponent ---------------------------------------
ALIGN_W = 24  # |q| < 2**7 shifted left by at most GUARD_MAX + ... : the wide port


def _align_case(codes, exps, guard=1, rnd=Rounding.RND_CONV) -> Case:
    return {"q": list(codes), "e": _zero_exps(list(codes), list(exps)), "guard": [guard], "rnd": [int(rnd)]}


def _align_corner(rng: np.random.Generator) -> list[Case]:
    cases = []
    for r in ROUNDINGS:
        for q in (2, 3, -4, -3):
            for g in (0, 2):
                cases.append(_align_case([5, 0, 0, 0, q * 8 + 4, 0, 0, 0, 1, -1], [0, -3 - g, 0], g, r))
    cases.append(_align_case([1, 2, 3, 4, -7, 7, 1, 0, 0, 0], [10, -60, 0], 0))
    cases.append(_align_case([0] * DOT_K, [0, 0, 0], 3))
    cases.append(_align_case([1, 2, 3, 4, 0, 0, 0, 0, 5, 6], [0, 0, -2], GUARD_MAX))
    return cases


def _align_random(rng: np.random.Generator) -> Case:
    c = _dot_random(rng)
    return _align_case(c["a"], c["ea"], c["guard"][0], c["align_rnd"][0])


def _align_expect(c: Case) -> Case:
    wide, e_ref = _align_one(c["q"], c["e"], c["guard"][0], c["rnd"][0], -1)
    return {"wide": [int(v) for v in wide.ravel()], "e_ref": [e_ref]}


def _align_inspect(c: Case) -> Counter:
    sub = {"a": c["q"], "ea": c["e"], "b": c["q"], "eb": c["e"], "guard": c["guard"], "align_rnd": c["rnd"]}
    return Counter({k: v for k, v in _operand_hits(sub, "a").items()})


register(
    KernelStimulus(
        name="align",
        describes=f"align of one group: {DOT_K} s8 codes in blocks of {DOT_BS} (one exponent each) to "
        "e_ref = max(e) - guard, wide = q >>r (e_ref - e_block) (docs/KERNELS.md, align)",
        ports=(
            Port("q", "in", 8, True, DOT_K, "s8 codes"),
            Port("e", "in", 16, True, DOT_NB, "block exponents (EXP_ZERO = -1024: all-zero block)"),
            Port("guard", "in", 4, False, doc=f"guard bits, 0..{GUARD_MAX}"),
            Port("rnd", "in", 3, False, doc="rounding of the right shifts"),
            Port("wide", "out", ALIGN_W, True, DOT_K, "aligned values at e_ref"),
            Port("e_ref", "out", 16, True, doc="the group's exponent"),
        ),
        bins=tuple(
            _tie_bins("align")
            + ["align.right_beyond_62", "align.left_guard", "operand.all_zero", "block.all_zero"]
            + ["block.partial_last_nonzero"]
        ),
        corner=_align_corner,
        random=_align_random,
        expect=_align_expect,
        inspect=_align_inspect,
        hdl_parameters={"K": DOT_K, "BS": DOT_BS, "NB": DOT_NB},
    )
)


# -- add: residual sum of two block-scaled rows, requantized ----------------------------------------------
def _add_case(a, ea, b, eb, rnd=Rounding.RND_CONV, sat=Saturation.SAT, exp_out=None) -> Case:
    return {
        "a": list(a),
        "ea": _zero_exps(list(a), list(ea)),
        "b": list(b),
        "eb": _zero_exps(list(b), list(eb)),
        "rnd": [int(rnd)],
        "sat": [int(sat)],
        "static": [int(exp_out is not None)],
        "exp_out": list(exp_out) if exp_out is not None else [0] * DOT_NB,
    }


def _add_corner(rng: np.random.Generator) -> list[Case]:
    cases = []
    z = [0] * DOT_K
    for r in ROUNDINGS:
        for q in (2, 3, -4, -3):  # static, 2 steps up: q*4 + 2 is a tie
            cases.append(
                _add_case([q * 4 + 2] + [1] * 9, [0, 0, 0], [0, 1] + [0] * 8, [0, 0, 0], r, Saturation.SAT, [2, 2, 2])
            )
        # dynamic: 255 needs 8 bits + sign; 127.5 rounded up to 128 forces one more shift
        cases.append(_add_case([127] + [0] * 9, [1, 0, 0], [1] + [0] * 9, [0, 0, 0], r))
        for s in SATURATIONS:
            for sign in (1, -1):
                cases.append(
                    _add_case([sign * 127] * DOT_K, [0, 0, 0], [sign * 100] * DOT_K, [0, 0, 0], r, s, [0, 0, 0])
                )
    # the SAT_SYM refusal in dynamic mode: -255 >> 1 floors to -128
    cases.append(_add_case([-127] + [0] * 9, [1, 0, 0], [-1] + [0] * 9, [0, 0, 0], Rounding.TRN, Saturation.SAT_SYM))
    # an operand 40 steps below the other: rounded, not shifted 40 bits left
    cases.append(
        _add_case([100, 3, 0, 0, 1, 1, 1, 1, 2, 2], [10, 0, 0], [77, -77, 5, 0, 1, 1, 1, 1, 3, 3], [-30, 0, 0])
    )
    cases.append(_add_case(z, [0, 0, 0], [0, 0, 0, 0, 4, 4, 4, 4, 1, 1], [0, 0, -3]))
    cases.append(_add_case(z, [0, 0, 0], z, [0, 0, 0]))
    return cases


def _add_random(rng: np.random.Generator) -> Case:
    c = _dot_random(rng)
    static = rng.random() < 0.5
    e_out = [max(c["ea"][i], c["eb"][i], -20) + int(rng.integers(-3, 4)) for i in range(DOT_NB)]
    return _add_case(
        c["a"], c["ea"], c["b"], c["eb"], int(rng.integers(6)), int(rng.integers(3)), e_out if static else None
    )


def _add_qt(codes: list[int], exps: list[int]) -> QTensor:
    fmt = IntFormat(bits=8, signed=True, block_axis=-1, block_size=DOT_BS)
    return QTensor(np.array(codes, np.int8).reshape(1, DOT_K), fmt, np.array(exps, np.int32).reshape(1, DOT_NB))


def _add_out_fmt(c: Case) -> IntFormat:
    return IntFormat(bits=8, signed=True, block_size=DOT_BS, rounding=c["rnd"][0], saturation=c["sat"][0])


def _add_expect(c: Case) -> Case:
    from bbct.kernels.add import add

    e_out = np.array(c["exp_out"], np.int32).reshape(1, DOT_NB) if c["static"][0] else None
    y = add(_add_qt(c["a"], c["ea"]), _add_qt(c["b"], c["eb"]), _add_out_fmt(c), e_out)
    return {"y": [int(v) for v in y.data.ravel()], "ey": [int(v) for v in np.ravel(y.exp)], "ovf": [y.meta["overflow"]]}


def _add_inspect(c: Case) -> Counter:
    from bbct.kernels.add import MAX_ALIGN

    hits: Counter = Counter()
    r, sat = c["rnd"][0], c["sat"][0]
    for blk in range(DOT_NB):
        js = range(blk * DOT_BS, min(DOT_K, (blk + 1) * DOT_BS))
        exps = [e for e in (c["ea"][blk], c["eb"][blk]) if e != EXP_ZERO]
        if not exps:
            hits["block.all_zero_both"] += 1
            continue
        e = max(min(exps), max(exps) - MAX_ALIGN)
        s = []
        for j in js:  # the exact sum at e, as the spec forms it
            terms = []
            for v, ev in ((c["a"][j], c["ea"][blk]), (c["b"][j], c["eb"][blk])):
                sh = min(62, e - ev)
                if v and sh > 0 and v % (1 << sh):
                    hits["operand.far_rounded"] += 1
                terms.append(shift_round_ref(v, sh, r))
            s.append(sum(terms))
        if js[-1] == DOT_K - 1 and DOT_K % DOT_BS and any(s):
            hits["block.partial_last_nonzero"] += 1
        if not any(s):
            continue
        sh = (c["exp_out"][blk] if c["static"][0] else c["ey"][blk]) - e
        if not c["static"][0]:
            amax = max(abs(v) for v in s)
            if sh > bit_length_ref(amax) - 7:
                hits["dynamic.round_up_extra_shift"] += 1
        for v in s:
            if v and _tie(v, sh):
                hits[_tie_bin("out", v, sh, r)] += 1
            if (b := _narrow_bin("out", shift_round_ref(v, sh, r), 8, sat)) is not None:
                hits[b + (".static" if c["static"][0] else ".dynamic")] += 1
    return hits


register(
    KernelStimulus(
        name="add",
        describes=f"residual add of two rows of {DOT_K} s8 codes (blocks of {DOT_BS}, one exponent each), "
        "requantized to s8 in the same blocks, static (exp_out) or dynamic (docs/KERNELS.md, add)",
        ports=(
            Port("a", "in", 8, True, DOT_K, "s8 codes of a"),
            Port("ea", "in", 16, True, DOT_NB, "a's block exponents"),
            Port("b", "in", 8, True, DOT_K, "s8 codes of b"),
            Port("eb", "in", 16, True, DOT_NB, "b's block exponents"),
            Port("rnd", "in", 3, False, doc="output format's rounding"),
            Port("sat", "in", 2, False, doc="output format's saturation"),
            Port("static", "in", 1, False, doc="1: requantize to exp_out; 0: dynamic block exponents"),
            Port("exp_out", "in", 16, True, DOT_NB, "static output exponents (ignored when dynamic)"),
            Port("y", "out", 8, True, DOT_K, "s8 sum codes"),
            Port("ey", "out", 16, True, DOT_NB, "output block exponents"),
            Port("ovf", "out", 8, False, doc="saturated elements"),
        ),
        bins=tuple(
            _tie_bins("out")
            + [f"{b}.static" for b in _sat_bins("out")]
            + ["out.sat.SAT_SYM.lo.dynamic", "dynamic.round_up_extra_shift", "operand.far_rounded"]
            + ["block.all_zero_both", "block.partial_last_nonzero"]
        ),
        corner=_add_corner,
        random=_add_random,
        expect=_add_expect,
        inspect=_add_inspect,
        hdl_parameters={"K": DOT_K, "BS": DOT_BS, "NB": DOT_NB},
    )
)


# -- softmax: one row of T s16 scores with a padding mask --------------------------------------------------
SM_T, SM_E_IN = 8, -9
SM_MASK_ADD = -(1 << 16)  # below every s16 score: the masked sum saturates to the type minimum


@functools.cache
def _sm_params():
    from bbct.kernels.softmax import make_softmax_params

    return make_softmax_params(SM_E_IN, in_bits=16, out_bits=8)


def _sm_case(x, mask=None) -> Case:
    return {"x": [int(v) for v in x], "mask": list(mask) if mask is not None else [0] * SM_T}


def _sm_corner(rng: np.random.Generator) -> list[Case]:
    lo, hi = int_range(16, True)
    return [
        _sm_case([0] * SM_T),  # uniform: every probability the same
        _sm_case([0, -355] + [-20000] * (SM_T - 2)),
        _sm_case([hi] + [lo] * (SM_T - 1)),  # one certain winner: 1.0 saturates, exp underflows to 0
        _sm_case([100, 200, 300, 400, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]),  # padded row
        _sm_case([5, -3, 7, 0, 1, 2, 3, 4], [0] + [1] * (SM_T - 1)),  # a single position left
        _sm_case([5, -3, 7, 0, 1, 2, 3, 4], [1] * SM_T),  # fully masked: uniform
        _sm_case([-30000, -30000, 2000, 1000, 0, -1000, -2000, -3000]),
    ]


def _sm_random(rng: np.random.Generator) -> Case:
    spread = int(rng.choice([200, 2000, 20000]))
    x = [int(np.clip(v, -32768, 32767)) for v in rng.integers(-spread, spread + 1, SM_T)]
    n_pad = int(rng.integers(0, SM_T)) if rng.random() < 0.3 else 0
    return _sm_case(x, [0] * (SM_T - n_pad) + [1] * n_pad)


def _sm_expect(c: Case) -> Case:
    from bbct.kernels.softmax import softmax

    m = np.array(c["mask"], np.int64) * SM_MASK_ADD
    y = softmax(np.array(c["x"], np.int64).reshape(1, SM_T), m.reshape(1, SM_T), _sm_params())
    return {"y": [int(v) for v in y.ravel()]}


def _sm_inspect(c: Case) -> Counter:
    from bbct.kernels.softmax import exp_int

    hits: Counter = Counter()
    lo, hi = int_range(16, True)
    z = [max(lo, min(hi, x + m * SM_MASK_ADD)) for x, m in zip(c["x"], c["mask"], strict=True)]
    d = np.array(z, np.int64) - max(z)
    e = exp_int(d, _sm_params())  # bbct's own exp: which values vanish
    n_mask = sum(c["mask"])
    if n_mask == SM_T:
        hits["row.fully_masked"] += 1
    elif n_mask == SM_T - 1:
        hits["row.one_position_left"] += 1
    elif n_mask:
        hits["row.padded"] += 1
    if any(x + m * SM_MASK_ADD < lo for x, m in zip(c["x"], c["mask"], strict=True)):
        hits["in.masked_sum_saturates"] += 1
    if any(x in (lo, hi) for x in c["x"]):
        hits["in.extreme_code"] += 1
    if len(set(z)) == 1:
        hits["row.all_equal"] += 1
    if any(int(v) == 0 for v, m in zip(e, c["mask"], strict=True) if not m):
        hits["exp.underflow_to_zero"] += 1
    if (1 << 8) - 1 in c["y"]:
        hits["out.saturates_at_one"] += 1
    if any(y == 0 and not m for y, m in zip(c["y"], c["mask"], strict=True)):
        hits["out.zero_probability_unmasked"] += 1
    return hits


register(
    KernelStimulus(
        name="softmax",
        describes=f"softmax of one row of {SM_T} s16 scores at 2**{SM_E_IN} (poly exp, u8 out at 2**-8); a "
        f"masked position adds {SM_MASK_ADD} before the input saturation (docs/KERNELS.md, softmax)",
        ports=(
            Port("x", "in", 16, True, SM_T, f"scores at 2**{SM_E_IN}"),
            Port("mask", "in", 1, False, SM_T, "1 = masked position"),
            Port("y", "out", 8, False, SM_T, "probabilities, u8 at 2**-8"),
        ),
        bins=(
            "row.fully_masked",
            "row.one_position_left",
            "row.padded",
            "row.all_equal",
            "in.masked_sum_saturates",
            "in.extreme_code",
            "exp.underflow_to_zero",
            "out.saturates_at_one",
            "out.zero_probability_unmasked",
        ),
        corner=_sm_corner,
        random=_sm_random,
        expect=_sm_expect,
        inspect=_sm_inspect,
        hdl_parameters={"T": SM_T, "E_IN": SM_E_IN, "MASK_ADD": SM_MASK_ADD},
    )
)


# -- gelu: the erf polynomial, one s16 element to s8 --------------------------------------------------------
GELU_E_IN, GELU_E_OUT, GELU_OUT = -10, -4, 8


@functools.cache
def _gelu_params():
    from bbct.kernels.gelu import make_gelu_poly

    return make_gelu_poly(GELU_E_IN, in_bits=16, out_bits=GELU_OUT, e_out=GELU_E_OUT)


def _gelu_final(q: int) -> tuple[int, int]:
    """(value, shift) of the last ``>>RND``: ``q * (2**F + E)`` and ``F + 1 + e_out - e_in``, from
    the spec's steps with the kernel's integer constants."""
    p = _gelu_params()
    one = 1 << p.frac
    u = min(abs(q), p.c_q)
    L = shift_round_ref(p.a_q * (u - p.c_q) ** 2, p.s_a, Rounding.RND) + one
    e = L if q > 0 else (-L if q < 0 else 0)
    return q * (one + e), p.frac + 1 + p.e_out - p.e_in


def _gelu_corner(rng: np.random.Generator) -> list[Case]:
    lo, hi = int_range(16, True)
    p = _gelu_params()
    picks = [0, 1, -1, lo, hi, p.c_q, -p.c_q, p.c_q - 1, -(p.c_q + 1), 1024, -1024]
    found = 0
    for q in range(0, hi + 1):  # ties of the final shift: found by search, measured by inspect
        v, s = _gelu_final(q)
        if _tie(v, s):
            picks.append(q)
            found += 1
            if found == 3:
                break
    return [{"x": [q]} for q in picks]


def _gelu_random(rng: np.random.Generator) -> Case:
    return {"x": [int(rng.integers(-32768, 32768))]}


def _gelu_expect(c: Case) -> Case:
    from bbct.kernels.gelu import gelu_poly

    return {"y": [int(gelu_poly(np.array(c["x"], np.int64), _gelu_params())[0])]}


def _gelu_inspect(c: Case) -> Counter:
    hits: Counter = Counter()
    q, p = c["x"][0], _gelu_params()
    lo, hi = int_range(16, True)
    v, s = _gelu_final(q)
    if _tie(v, s):  # only positive inputs have one: q * (2**F + E) of a negative q never does (exhaustive)
        hits["final.tie"] += 1
    if abs(q) >= p.c_q:
        hits[f"in.erf_clipped.{'neg' if q < 0 else 'pos'}"] += 1
    if q in (lo, hi):
        hits["in.extreme_code"] += 1
    if q == 0:
        hits["in.zero"] += 1
    if saturate_ref(shift_round_ref(v, s, Rounding.RND), GELU_OUT, True, Saturation.SAT)[1]:
        hits["out.sat.hi"] += 1
    return hits


register(
    KernelStimulus(
        name="gelu",
        describes=f"GELU by the erf polynomial: s16 in at 2**{GELU_E_IN}, s{GELU_OUT} out at 2**{GELU_E_OUT} "
        "(docs/KERNELS.md, gelu); the final >>RND rounds half up",
        ports=(
            Port("x", "in", 16, True, doc=f"input at 2**{GELU_E_IN}"),
            Port("y", "out", GELU_OUT, True, doc=f"GELU at 2**{GELU_E_OUT}"),
        ),
        bins=(
            "final.tie",
            "in.erf_clipped.pos",
            "in.erf_clipped.neg",
            "in.extreme_code",
            "in.zero",
            "out.sat.hi",
        ),
        corner=_gelu_corner,
        random=_gelu_random,
        expect=_gelu_expect,
        inspect=_gelu_inspect,
        hdl_parameters={"E_IN": GELU_E_IN, "E_OUT": GELU_E_OUT, "OUT_BITS": GELU_OUT},
    )
)


# -- layernorm: one row of H wide codes at a per-row exponent ---------------------------------------------
LN_H, LN_IN, LN_OUT, LN_E_OUT = 8, 28, 8, -5
LN_GAMMA = (1.0, 1.0, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0)
LN_BETA = (2.0, -2.0, 0.0, 0.25, 0.5, -0.5, 0.0, 0.0)  # 1.0 is 32 codes: +-2 pushes the ends past s8


@functools.cache
def _ln_params(out_bits: int = LN_OUT):
    from bbct.kernels.layernorm import make_layernorm_params

    return make_layernorm_params(np.array(LN_GAMMA), np.array(LN_BETA), 1e-12, out_exp=LN_E_OUT, out_bits=out_bits)


def _ln_steps(x: list[int], e_row: int) -> dict[str, Any]:
    """The spec's steps for one row (math.isqrt, not bbct's): the values each shift sees."""
    import math

    from bbct.kernels.layernorm import RB

    p, h = _ln_params(), LN_H
    b = max(abs(v) for v in x).bit_length()
    m = (59 - h.bit_length() - 2 * b) // 2
    mu = (sum(x) * 2 ** (m + 1) + h) // (2 * h)
    d = [(v << m) - mu for v in x]
    var = sum(v * v for v in d)
    eps_shift = 2 * (e_row - m) - p.eps_e
    var = min(var + shift_round_ref(h * p.eps_m, eps_shift, Rounding.RND), (1 << 62) - 1)
    t = max(0, (61 - var.bit_length()) // 2)
    sigma = math.isqrt((var << 2 * t) // h)
    recip = (1 << RB) // sigma if sigma else 0
    n_shift = RB - p.norm_frac_bits - t
    n = [shift_round_ref(v * recip, n_shift, Rounding.RND) for v in d]
    y_shift = p.e_out - p.e_gamma + p.norm_frac_bits
    return {
        "m": m,
        "eps_shift": eps_shift,
        "eps": h * p.eps_m,
        "d": d,
        "recip": recip,
        "n_shift": n_shift,
        "n": n,
        "y_shift": y_shift,
    }


def _ln_ties(x: list[int], e_row: int) -> tuple[bool, bool]:
    st = _ln_steps(x, e_row)
    g = _ln_params().gamma
    return (
        any(_tie(v * st["recip"], st["n_shift"]) for v in st["d"]),
        any(_tie(int(v) * int(gj), st["y_shift"]) for v, gj in zip(st["n"], g, strict=True)),
    )


def _ln_corner(rng: np.random.Generator) -> list[Case]:
    top = (1 << (LN_IN - 1)) - 1
    cases = [
        {"x": [-3, -1, 1, 3, -3, -1, 1, 3], "e_row": [0]},
        {"x": [7] * LN_H, "e_row": [0]},  # constant row: y = beta
        {"x": [0] * LN_H, "e_row": [0]},
        {"x": [top, -top, top, -top, 0, 0, 0, 0], "e_row": [-30]},  # full headroom
        {"x": [1, 0, 0, 0, 0, 0, 0, 0], "e_row": [-20]},  # eps shifted left
        {"x": [1, 0, 0, 0, 0, 0, 0, 0], "e_row": [-60]},  # eps beyond 62 bits: V saturates
        {"x": [100, 0, 0, 0, 0, 0, 0, -100], "e_row": [40]},  # eps far below: shifted right away
        {"x": [1000, 0, 0, 0, 0, 0, 0, 0], "e_row": [0]},  # one outlier: 2.65 + beta 2.0 clips at the top
        {"x": [0, -1000, 0, 0, 0, 0, 0, 0], "e_row": [0]},  # and -2.65 - 2.0 at the bottom
    ]
    found = [False, False]
    for _ in range(20000):  # rows with an exact half at the normalization or output shift
        x = [int(v) for v in rng.integers(-300, 301, LN_H)]
        ties = _ln_ties(x, 0)
        for i in (0, 1):
            if ties[i] and not found[i]:
                cases.append({"x": x, "e_row": [0]})
                found[i] = True
        if all(found):
            break
    return cases


def _ln_random(rng: np.random.Generator) -> Case:
    bits = int(rng.integers(1, LN_IN))
    return {
        "x": [int(v) for v in rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), LN_H)],
        "e_row": [int(rng.integers(-40, 20))],
    }


def _ln_expect(c: Case) -> Case:
    from bbct.kernels.layernorm import layernorm

    y, _ = layernorm(np.array(c["x"], np.int64).reshape(1, LN_H), np.array([[c["e_row"][0]]]), _ln_params())
    return {"y": [int(v) for v in y.ravel()]}


def _ln_inspect(c: Case) -> Counter:
    from bbct.kernels.layernorm import layernorm

    hits: Counter = Counter()
    x, e_row = c["x"], c["e_row"][0]
    if not any(x):
        hits["row.all_zero"] += 1
    elif len(set(x)) == 1:
        hits["row.constant"] += 1
    if max(abs(v) for v in x).bit_length() == LN_IN - 1:
        hits["in.full_headroom"] += 1
    st = _ln_steps(x, e_row)
    if st["eps_shift"] < 0:
        big = st["eps"].bit_length() - st["eps_shift"] > 62
        hits["eps.beyond_62_bits_V_saturates" if big else "eps.left_shift"] += 1
    elif st["eps_shift"] > 62:
        hits["eps.right_shift_beyond_62"] += 1
    ties = _ln_ties(x, e_row)
    if ties[0]:
        hits["norm.tie"] += 1
    if ties[1]:
        hits["out.tie"] += 1
    # the values before the output saturation: the same row through a 24-bit output
    wide, _ = layernorm(np.array(x, np.int64).reshape(1, LN_H), np.array([[e_row]]), _ln_params(24))
    lo, hi = int_range(LN_OUT, True)
    if (wide > hi).any():
        hits["out.sat.hi"] += 1
    if (wide < lo).any():
        hits["out.sat.lo"] += 1
    return hits


register(
    KernelStimulus(
        name="layernorm",
        describes=f"LayerNorm of one row of {LN_H} s{LN_IN} codes at a per-row exponent e_row, eps 1e-12, "
        f"gamma {LN_GAMMA}, beta {LN_BETA}, s{LN_OUT} out at 2**{LN_E_OUT} (docs/KERNELS.md, layernorm)",
        ports=(
            Port("x", "in", LN_IN, True, LN_H, "row codes"),
            Port("e_row", "in", 16, True, doc="the row's exponent"),
            Port("y", "out", LN_OUT, True, LN_H, f"normalized row at 2**{LN_E_OUT}"),
        ),
        bins=(
            "row.all_zero",
            "row.constant",
            "in.full_headroom",
            "eps.left_shift",
            "eps.beyond_62_bits_V_saturates",
            "eps.right_shift_beyond_62",
            "norm.tie",
            "out.tie",
            "out.sat.hi",
            "out.sat.lo",
        ),
        corner=_ln_corner,
        random=_ln_random,
        expect=_ln_expect,
        inspect=_ln_inspect,
        hdl_parameters={"H": LN_H, "E_OUT": LN_E_OUT},
    )
)


def kernel_vectors(kernel: str, kind: str, count: int, seed: int, out: str | Path) -> int:
    """``bbct vectors --kernel``: write the vectors, print the coverage summary; 0."""
    st = generate(kernel, kind, count, seed)
    path = write_stimulus(st, out)
    print(coverage_table(st))
    print(path)
    return 0
