"""Mixed-precision search: per-op-class or per-layer weight bits and block sizes that
maximise weight compression under an accuracy-drop budget, chosen on training data only.

1. **Sensitivity.** Starting from a base config, each group of weights (an op class, or one
   class in one layer) is moved alone to each cheaper format of a menu (bits, block) and
   evaluated on a slice of the *train* split: the change in mean KL divergence of the
   integer class probabilities from the float ones (smooth, unlike the accuracy of a few
   hundred sentences) and the bytes saved, read off the lowered graph.
2. **Greedy allocation.** Moves are ordered by KL increase per byte saved, cheapest first
   (one move per group) — the order a fractional knapsack takes items in, near-optimal when
   every item is small against the whole, as one group of weights is here. An exact 0/1
   knapsack over the same numbers would optimise an additive-KL model that is itself only an
   approximation; instead the largest prefix of the ordered moves whose *measured* drop on
   the train slice stays within the budget is found by bisection (each step a real eval).
3. The winner is written as a config TOML that ``bbct eval`` takes, and evaluated once on the
   test split — the only time the test split is read.

Every evaluation is a sweep point (same table, same Dask workers, resumable).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from bbct.golden.errors import BbctError
from bbct.simulator.config import MATMUL_CLASSES
from bbct.simulator.explore.grid import Axis

DEFAULT_MENU = ((3, 128), (3, 64), (3, 32), (2, 64))


@dataclass
class Moves:
    """Sweep points of a search: the base, each (group, format) alone, and prefixes of moves.
    Duck-types :class:`~bbct.simulator.explore.grid.Grid` for :func:`run_sweep`."""

    base: dict[str, Any]
    base_name: str = "base"
    axes: tuple[Axis, ...] = (Axis("moves", ("moves",), ()),)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> config table path

    def point(self, values: tuple) -> dict[str, Any]:
        """``values``: one tuple of moves ``((group, bits, block), ...)``."""
        (moves,) = values
        d = copy.deepcopy(self.base)
        for group, bits, block in moves:
            t = d
            for name in self.groups[group]:
                t = t.setdefault(name, {})
            t.update({"weight_bits": bits, "weight_block": block})
        d["name"] = label(moves) if moves else self.base_name
        return d


def label(moves) -> str:
    return " ".join(f"{g}:{b}b/{k}" for g, b, k in moves) or "base"


def weight_groups(fg, granularity: str) -> dict[str, tuple[str, ...]]:
    """Groups of weights the search assigns formats to, and the config table of each:
    ``op.<class>`` for every matmul class the model has, or ``layer.<i>.<class>`` per layer
    (classes outside the layers, such as embedding and classifier, stay whole)."""
    from bbct.simulator.lower import assign_roles

    roles = assign_roles(fg).values()
    have = [c for c in MATMUL_CLASSES if any(r.op_class == c for r in roles)]
    if granularity == "class":
        return {c: ("op", c) for c in have}
    out: dict[str, tuple[str, ...]] = {}
    for c in have:
        layers = sorted({r.layer for r in roles if r.op_class == c and r.layer is not None})
        if layers:
            out.update({f"L{i}.{c}": ("layer", str(i), c) for i in layers})
        else:
            out[c] = ("op", c)
    return out


def greedy_order(base: dict, singles: dict[tuple, dict]) -> list[tuple[str, int, int]]:
    """Steps of the greedy allocation: each moves one group to a cheaper format; a prefix of
    the list is a config (a group takes the format of its last step in the prefix).

    This is the greedy of the multiple-choice knapsack's LP relaxation: per group, the formats
    on the lower convex hull of (bytes saved, KL increase) become steps with rising marginal
    cost, and the steps of all groups are merged by marginal cost (KL per byte), cheapest first."""
    by_group: dict[str, list[tuple[float, float, tuple]]] = {}
    for move, row in singles.items():
        saved = base["weight_bytes"] - row["weight_bytes"]
        if saved > 0 and row.get("logit_kl") is not None:
            by_group.setdefault(move[0], []).append((saved, row["logit_kl"] - base["logit_kl"], move))
    steps: list[tuple[float, tuple]] = []
    for opts in by_group.values():
        hull: list[tuple[float, float, tuple | None]] = [(0.0, 0.0, None)]
        for saved, dkl, move in sorted(opts, key=lambda o: (o[0], o[1])):
            if saved == hull[-1][0]:
                continue  # same bytes, more KL (sorted): never better
            hull.append((saved, dkl, move))
            while len(hull) >= 3 and _slope(hull[-3], hull[-2]) >= _slope(hull[-2], hull[-1]):
                del hull[-2]  # not on the lower hull: a mix of its neighbours dominates it
        steps += [(_slope(a, b), b[2]) for a, b in zip(hull, hull[1:], strict=False)]
    return [m for _, m in sorted(steps, key=lambda sm: (sm[0], sm[1]))]


def _slope(a: tuple, b: tuple) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


def final(moves) -> tuple[tuple[str, int, int], ...]:
    """The format each group ends with after ``moves`` (its last step), in first-step order."""
    last: dict[str, tuple[str, int, int]] = {}
    for m in moves:
        last[m[0]] = tuple(m)
    return tuple(last.values())


def to_toml(tables: dict[str, Any]) -> str:
    """A config's tables as TOML (what :func:`~bbct.simulator.config.load_config` reads)."""

    def val(v: Any) -> str:
        return json.dumps(v)  # ints, strings and booleans print the same in TOML and JSON

    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    lines = [f"{key(k)} = {val(v)}" for k, v in tables.items() if not isinstance(v, dict)]

    def walk(prefix: list[str], t: dict[str, Any]) -> None:
        flat = {k: v for k, v in t.items() if not isinstance(v, dict)}
        if flat:
            lines.append(f"\n[{'.'.join(key(p) for p in prefix)}]")
            lines.extend(f"{key(k)} = {val(v)}" for k, v in flat.items())
        for k, v in t.items():
            if isinstance(v, dict):
                walk(prefix + [k], v)

    for k, v in tables.items():
        if isinstance(v, dict):
            walk([k], v)
    return "\n".join(lines) + "\n"


def run_search(
    model: str,
    base: dict[str, Any],
    train: Any,
    test: Any,
    out: Any,
    budget: float,
    granularity: str = "class",
    menu: tuple[tuple[int, int], ...] = DEFAULT_MENU,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    log: Any = print,
) -> dict[str, Any]:
    """Search (see the module docstring); ``train`` and ``test`` are
    :class:`~bbct.simulator.explore.sweep.BenchSpec`\\ s of the train slice and the test split.
    Writes OUT/search.toml and OUT/search.json; returns the summary."""
    from pathlib import Path

    from bbct.golden.atomic import write_json, write_text
    from bbct.simulator.explore.sweep import Sweep, _client, run_sweep
    from bbct.simulator.frontend.onnx_in import load_graph

    out = Path(out)
    groups = weight_groups(load_graph(model), granularity)
    moves = Moves(base, str(base.get("preset", "base")), groups=groups)
    own_client, cluster = None, None
    if client is None and workers != 0:
        client, cluster = _client(workers, scheduler)
        own_client = client

    def evaluate(spec, points: list[tuple], folder: str) -> dict[tuple, dict]:
        sw = Sweep(moves, spec, out / folder, [(p,) for p in points])
        table = run_sweep(sw, workers=workers, client=client)
        keys = {vals: k for k, vals, _ in sw.plan()}
        return {vals[0]: table.rows[keys[vals]] for vals in sw.points if vals in keys}

    try:
        singles = [((g, b, k),) for g in groups for b, k in menu]
        log(f"sensitivity: {len(groups)} groups x {len(menu)} formats on {train.limit or 'all'} train examples")
        rows = evaluate(train, [()] + singles, "train")
        base_row = rows[()]
        if base_row.get("error"):
            raise BbctError(f"the base config fails: {base_row['error']}")
        ok = {m[0]: r for m, r in rows.items() if m and not r.get("error")}
        order = greedy_order(base_row, ok)
        steps = []

        def feasible(k: int) -> bool:
            pt = final(order[:k])
            r = evaluate(train, [pt], "train")[pt]
            good = not r.get("error") and r["drop_points"] <= budget
            steps.append(
                {"moves": k, "drop_points": r.get("drop_points"), "weight_compression": r.get("weight_compression")}
            )
            log(f"  first {k} moves: train drop {r.get('drop_points')}, {r.get('weight_compression'):.2f}x")
            return good

        lo, hi = 0, len(order)
        order = [tuple(m) for m in order]
        if base_row["drop_points"] > budget:
            import sys

            print(
                f"bbct: warning: the base config already drops {base_row['drop_points']:.2f} points on train, "
                f"over the budget of {budget}: keeping it",
                file=sys.stderr,
            )
            hi = 0  # nothing cheaper than the base fits; the base is reported as it is
        elif feasible(hi):
            lo = hi
        while hi - lo > 1:  # invariant: prefix lo fits, prefix hi does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
        chosen = final(order[:lo])
        tables = moves.point((chosen,))
        tables["name"] = "search"
        write_text(out / "search.toml", to_toml(tables))
        train_row = evaluate(train, [chosen], "train")[chosen]
        log(f"chosen: {label(chosen)}; evaluating once on the test split")
        test_row = evaluate(test, [chosen], "test")[chosen]
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()
    summary = {
        "budget_points": budget,
        "target": "weight_compression",
        "granularity": granularity,
        "menu": [list(m) for m in menu],
        "method": "multiple-choice knapsack greedy (convex hull per group, steps by KL increase per byte saved); "
        "prefix length by bisection on the measured train drop",
        "train_examples": base_row.get("examples"),
        "base": {k: base_row.get(k) for k in ("drop_points", "weight_compression", "logit_kl")},
        "sensitivity": [
            {
                "group": m[0],
                "bits": m[1],
                "block": m[2],
                "kl_increase": r["logit_kl"] - base_row["logit_kl"],
                "bytes_saved": base_row["weight_bytes"] - r["weight_bytes"],
                "train_drop_points": r["drop_points"],
            }
            for m, r in ok.items()
        ],
        "order": [list(m) for m in order],
        "bisection": steps,
        "order_taken": [list(m) for m in order[:lo]],
        "chosen": [list(m) for m in chosen],
        "base_over_budget": base_row["drop_points"] > budget,
        "train": {k: train_row.get(k) for k in ("drop_points", "weight_compression", "weight_bits_per_param")},
        "test": {
            k: test_row.get(k)
            for k in (
                "float_accuracy",
                "int_accuracy",
                "drop_points",
                "agreement",
                "weight_compression",
                "weight_bits_per_param",
                "examples",
                "error",
            )
        },
        "config": str(out / "search.toml"),
    }
    write_json(out / "search.json", summary)
    return summary
