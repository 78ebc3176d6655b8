"""What a person comparing schemes needs from an eval besides two accuracies: the examples
whose class flipped, how sure the drop is, and the float-vs-integer confusion.

The confidence interval of an accuracy drop is paired: float and integers classify the same
sentences, so only the discordant ones (right in float, wrong in integers: ``b``; the other
way: ``c``) carry information. McNemar's exact test conditions on ``m = b + c``: under no
difference ``b ~ Binomial(m, 1/2)``. The drop is ``(b - c) / n = m (2p - 1) / n`` with
``p = b / m``, so the Clopper-Pearson interval of ``p`` maps to an exact interval of the
drop. That interval is conditional on the number of discordant sentences (it cannot exceed
``m / n``), so a paired bootstrap of the task's main metric is given beside it, which lets
``m`` vary too (any metric, not only accuracy; percentile interval of 2,000 resamples of the
sentences, seed 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bbct.simulator.tasks import Dataset, metric, predictions

ALPHA = 0.05


def _log_pmf(k: int, m: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == m else -math.inf
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * math.log(p) + (m - k) * math.log1p(-p)


def binom_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), summed in log space (m in the thousands is fine)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    logs = [_log_pmf(i, m, p) for i in range(k + 1)]
    top = max(logs)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _solve(f, lo: float = 0.0, hi: float = 1.0) -> float:
    """The root of a function increasing on [lo, hi], by bisection to 1e-10."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(b: int, m: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval of a binomial proportion with b successes in m."""
    if m == 0:
        return 0.0, 1.0
    lo = 0.0 if b == 0 else _solve(lambda p: (1 - binom_cdf(b - 1, m, p)) - alpha / 2)
    hi = 1.0 if b == m else _solve(lambda p: alpha / 2 - binom_cdf(b, m, p))
    return lo, hi


def mcnemar(labels: np.ndarray, f_pred: np.ndarray, i_pred: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of float vs integer accuracy and the exact 95 % interval of the
    drop in points (see the module docstring)."""
    fr, ir = f_pred == labels, i_pred == labels
    b, c, n = int(np.sum(fr & ~ir)), int(np.sum(~fr & ir)), len(labels)
    m = b + c
    p_value = min(1.0, 2.0 * binom_cdf(min(b, c), m, 0.5)) if m else 1.0
    lo, hi = clopper_pearson(b, m)
    return {
        "method": "McNemar exact (Clopper-Pearson interval on the discordant pairs)",
        "float_right_int_wrong": b,
        "float_wrong_int_right": c,
        "drop_points": 100.0 * (b - c) / n,
        "ci95_points": [100.0 * m * (2 * lo - 1) / n, 100.0 * m * (2 * hi - 1) / n],
        "p_value": p_value,
    }


def bootstrap_drop(data: Dataset, fl: np.ndarray, iq: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of the main metric's drop in points: percentile 95 % interval."""
    task = data.task
    main = task.metrics[0]
    y, fp, ip = np.asarray(data.labels), predictions(task, fl), predictions(task, iq)
    rng = np.random.default_rng(seed)
    n = len(y)
    if main == "accuracy":  # vectorised: a (resamples, n) index matrix
        idx = rng.integers(0, n, (resamples, n))
        d = 100.0 * ((fp[idx] == y[idx]).mean(1) - (ip[idx] == y[idx]).mean(1))
    else:
        d = np.empty(resamples)
        for r in range(resamples):
            i = rng.integers(0, n, n)
            d[r] = 100.0 * (metric(main, y[i], fp[i]) - metric(main, y[i], ip[i]))
    lo, hi = np.percentile(d, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return {
        "method": f"paired bootstrap of {main}, {resamples} resamples, seed {seed}, percentile",
        "ci95_points": [float(lo), float(hi)],
    }


def flips(data: Dataset, fl: np.ndarray, iq: np.ndarray) -> list[dict[str, Any]]:
    """The examples whose class differs between float and integers, with both scores."""
    task = data.task
    if task.is_regression:
        return []
    fp, ip = predictions(task, fl), predictions(task, iq)
    names = task.labels or ()
    out = []
    for i in np.flatnonzero(fp != ip):
        out.append(
            {
                "index": int(i),
                "text": data.texts[i],
                **({"pair": data.pairs[i]} if data.pairs else {}),
                "label": names[int(data.labels[i])],
                "float_class": names[int(fp[i])],
                "int_class": names[int(ip[i])],
                "float_logits": [float(v) for v in fl[i]],
                "int_logits": [float(v) for v in iq[i]],
            }
        )
    return out


def confusion(data: Dataset, fl: np.ndarray, iq: np.ndarray) -> dict[str, Any] | None:
    """Counts of (float class, integer class): the off-diagonal cells are the disagreements."""
    task = data.task
    if task.is_regression:
        return None
    k = task.num_labels
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (predictions(task, fl), predictions(task, iq)), 1)
    return {
        "labels": list(task.labels or ()),
        "rows": "float class",
        "columns": "integer class",
        "counts": counts.tolist(),
    }
