"""Plots drawn from the JSON a command writes (never from numbers computed a second time):
the Pareto front of a sweep, per-axis sensitivity, per-layer SQNR along the network, and
float-vs-integer logits. PNGs are written atomically; matplotlib runs headless (Agg)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden.atomic import write_bytes
from bbct.golden.errors import BbctError

DPI = 100


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise BbctError("plots need matplotlib: pip install 'bbct[explore]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return write_bytes(path, buf.getvalue())


def pareto_front(rows: Sequence[dict], x: str = "weight_compression", y: str = "int_accuracy") -> list[dict]:
    """The rows no other row beats on both ``x`` (higher is better) and ``y`` (higher is
    better; give ``drop_points`` and it is minimised), sorted by ``x``."""
    sign = -1.0 if y == "drop_points" else 1.0
    ok = [r for r in rows if r.get(x) is not None and r.get(y) is not None and not r.get("error")]
    front = []
    for r in ok:
        rx, ry = r[x], sign * r[y]
        if not any((o[x] >= rx and sign * o[y] >= ry) and (o[x] > rx or sign * o[y] > ry) for o in ok if o is not r):
            front.append(r)
    return sorted(front, key=lambda r: r[x])


def pareto_plot(rows: Sequence[dict], path: str | Path, y: str = "drop_points", size=(8, 6)) -> list[dict]:
    """Every point's ``y`` against weight compression, the front joined and labelled by point."""
    plt = _plt()
    front = pareto_front(rows, y=y)
    ok = [r for r in rows if r.get(y) is not None and not r.get("error")]
    fig, ax = plt.subplots(figsize=size)
    ax.scatter([r["weight_compression"] for r in ok], [r[y] for r in ok], s=18, c="0.6", label="points")
    ax.plot([r["weight_compression"] for r in front], [r[y] for r in front], "o-", c="tab:red", label="Pareto front")
    for r in front:
        ax.annotate(
            r.get("point", r.get("key", ""))[:60],
            (r["weight_compression"], r[y]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("weight compression vs fp32 (x, block exponents counted)")
    ax.set_ylabel({"drop_points": "accuracy drop (points)", "int_accuracy": "integer accuracy"}.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{len(ok)} points, {len(front)} on the front")
    fig.tight_layout()
    _save(fig, path)
    return front


def sensitivity_plot(rows: Sequence[dict], axes: Sequence[str], path: str | Path, y: str = "drop_points") -> None:
    """For each axis, the mean (and range) of ``y`` over the points at each of its values."""
    plt = _plt()
    ok = [r for r in rows if r.get(y) is not None and not r.get("error")]
    n = max(1, len(axes))
    fig, axs = plt.subplots(1, n, figsize=(3.2 * n + 1, 4), squeeze=False)
    for ax, name in zip(axs[0], axes, strict=False):
        vals = list(dict.fromkeys(r[name] for r in ok if name in r))
        if all(isinstance(v, (int, float)) for v in vals):
            vals.sort()  # numbers in order; names (methods, modes) as the grid lists them
        ys = [[r[y] for r in ok if r.get(name) == v] for v in vals]
        pos = np.arange(len(vals))
        means = [float(np.mean(v)) for v in ys]
        lo = [m - min(v) for m, v in zip(means, ys, strict=True)]
        hi = [max(v) - m for m, v in zip(means, ys, strict=True)]
        ax.errorbar(pos, means, yerr=[lo, hi], fmt="o-", capsize=3)
        ax.set_xticks(pos, [str(v) for v in vals], rotation=30, fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel(f"{y} (mean, min..max)")
    fig.tight_layout()
    _save(fig, path)


def layers_plot(reports: Sequence[dict], path: str | Path) -> None:
    """Per-layer SQNR and cosine along the network, one line per ``bbct run --json`` report,
    the threshold drawn and each report's first tensor below it marked."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    names: list[str] = []
    for rep in reports:
        layers = rep["layers"]
        if len(layers) > len(names):
            names = [r["node"] for r in layers]
        x = np.arange(len(layers))
        sq = [r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in layers]
        label = rep.get("config", {}).get("name", "config")
        (line,) = a1.plot(x, sq, ".-", label=label, lw=1)
        a2.plot(x, [r["cosine"] for r in layers], ".-", lw=1, color=line.get_color())
        first = rep.get("first_below")
        if first is not None:
            i = next(i for i, r in enumerate(layers) if r["node"] == first)
            a1.plot([i], [sq[i]], "v", ms=10, color=line.get_color())
            a1.annotate(f"first below: {first}", (i, sq[i]), fontsize=7, xytext=(4, -12), textcoords="offset points")
    thr = reports[0].get("threshold_db")
    if thr is not None:
        a1.axhline(thr, ls="--", c="k", lw=0.8, label=f"threshold {thr} dB")
    a1.set_ylabel("SQNR (dB)")
    a2.set_ylabel("cosine")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    step = max(1, math.ceil(len(names) / 40))
    a2.set_xticks(np.arange(0, len(names), step), names[::step], rotation=90, fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def eval_plot(report: dict, path: str | Path) -> None:
    """Float vs integer logits (one dot per example and class) and the confusion of the
    examples whose class differs between float and integers, from a ``bbct eval --json``."""
    plt = _plt()
    fl = np.asarray(report["logits"]["float"], np.float64)
    il = np.asarray(report["logits"]["int"], np.float64)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5))
    for c in range(fl.shape[1]):
        a1.scatter(fl[:, c], il[:, c], s=4, alpha=0.5, label=f"logit {c}")
    lo, hi = float(min(fl.min(), il.min())), float(max(fl.max(), il.max()))
    a1.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    a1.set_xlabel("float logit")
    a1.set_ylabel("integer logit")
    a1.legend(fontsize=7)
    a1.set_title(f"{len(fl)} examples")
    conf = np.asarray(report["disagreement_confusion"]["counts"])
    names = report["disagreement_confusion"]["labels"]
    off = conf.copy()
    np.fill_diagonal(off, 0)  # colour the disagreements only; the agreeing diagonal would swamp them
    a2.imshow(off, cmap="Reds", vmin=0)
    for (i, j), v in np.ndenumerate(conf):
        dark = off[i, j] > off.max() / 2
        a2.text(j, i, str(v), ha="center", va="center", color="white" if dark else "black")
    a2.set_xticks(range(len(names)), names)
    a2.set_yticks(range(len(names)), names)
    a2.set_xlabel("integer class")
    a2.set_ylabel("float class")
    a2.set_title(f"float vs integer class ({int(conf.sum()) - int(np.trace(conf))} disagree)")
    fig.tight_layout()
    _save(fig, path)
