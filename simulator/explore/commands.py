"""``bbct sweep`` and ``bbct search``: argument parsing and reports (the work is in
:mod:`~bbct.simulator.explore.sweep` and :mod:`~bbct.simulator.explore.search`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bbct.golden.errors import BbctError


def add_task_args(p: argparse.ArgumentParser, limit: bool = True) -> None:
    """--task and the user-task columns, shared by eval, sweep and search."""
    from bbct.golden.paths import TASK

    p.add_argument(
        "--task",
        default=TASK,
        help="rt-polarity (prepared), a GLUE task with --data, or a task FILE.toml for your own data",
    )
    p.add_argument("--split", default="test", help="split file name in a --data folder (test for RT, dev for GLUE)")
    p.add_argument("--text-col", default=None, help="your own data: the text column (header name)")
    p.add_argument("--pair-col", default=None, help="your own data: the second text column of pairs")
    p.add_argument("--label-col", default="label", help="your own data: the label column")
    p.add_argument("--labels", default=None, help="your own data: class names in logit order, comma-separated")
    p.add_argument("--regression", action="store_true", help="your own data: the label is a number (one output)")
    if limit:
        from bbct.simulator.cli import _positive

        p.add_argument("--limit", type=_positive, default=None, help="only the first N examples (None: all)")


def task_from_args(args: argparse.Namespace):
    from bbct.simulator.tasks import get_task, user_task

    own = args.text_col is not None or args.labels is not None or args.regression
    if not own:
        return get_task(args.task)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    name = args.task if args.task and args.task != "rt-polarity" else "user"
    return user_task(
        name=name,
        text=args.text_col or "sentence",
        pair=args.pair_col,
        label=args.label_col,
        labels=labels,
        regression=args.regression,
    )


def dataset_from_args(args: argparse.Namespace, limit: int | None = None):
    from bbct.simulator.tasks import load_dataset

    return load_dataset(task_from_args(args), args.data, args.split, limit)


# -- sweep -----------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from bbct.simulator.cli import _calib_texts, _model
    from bbct.simulator.explore.grid import load_grid
    from bbct.simulator.explore.plots import pareto_plot, sensitivity_plot
    from bbct.simulator.explore.sweep import BenchSpec, Sweep, run_sweep

    grid = load_grid(args.grid)
    task = task_from_args(args)
    model = _model(args)
    dataset_from_args(args, args.limit)  # bad data fails here, before any worker starts
    needs_calib = any(_needs_calib(grid.point(v)) for v in grid.points())
    calib, source = _calib_texts(args) if needs_calib else ([], "")
    spec = BenchSpec(
        str(model.resolve()),
        task,
        str(Path(args.data).resolve()) if args.data else None,
        args.split,
        args.limit,
        tuple(calib),
        source,
        args.max_length,
        args.batch,
        args.layer_examples,
    )
    points = grid.points(args.max, args.sample, args.seed)
    out = Path(args.out)
    sweep = Sweep(grid, spec, out, points)
    workers = 0 if args.workers == 0 else args.workers
    t0 = time.time()
    table = run_sweep(sweep, workers=workers, scheduler=args.scheduler)
    wall = time.time() - t0
    keys = {k for k, *_ in sweep.plan()}  # this grid's points (the folder may hold others)
    rows = [r for r in table.rows.values() if r["key"] in keys]
    bad = [r for r in rows if r.get("error")]
    y = "drop_points"
    front = pareto_plot(rows, out / "pareto.png", y=y)
    if grid.axes:
        sensitivity_plot(rows, [a.name for a in grid.axes], out / "sensitivity.png", y=y)
    from bbct.golden.atomic import write_json

    write_json(
        out / "summary.json",
        {
            "grid": str(args.grid),
            "points": len(rows),
            "failed": len(bad),
            "wall_s": round(wall, 1),
            "workers": args.scheduler or (args.workers if args.workers is not None else "cores"),
            "front": [{k: r.get(k) for k in ("key", "point", "weight_compression", y, "int_accuracy")} for r in front],
        },
    )
    print(f"{len(rows)} points ({len(bad)} failed) in {wall:.0f} s -> {out / 'rows.csv'}")
    print(f"\nPareto front (drop in points vs weight compression), {len(front)} points:")
    print(f"{'compression':>11} {'drop pt':>8} {'int acc':>8}  point")
    for r in front:
        print(
            f"{r['weight_compression']:>10.2f}x {r[y]:>8.2f} {r.get('int_accuracy', float('nan')):>8.4f}  {r['point']}"
        )
    for r in bad[:5]:
        print(f"bbct: warning: point {r.get('point')}: {r['error']}", file=sys.stderr)
    print(f"\nplots: {out / 'pareto.png'}" + (f", {out / 'sensitivity.png'}" if grid.axes else ""))
    return 0


def _needs_calib(tables: dict[str, Any]) -> bool:
    from bbct.simulator.config import load_config

    return load_config(tables).needs_calibration


def add_sweep(sub: Any) -> None:
    from bbct.simulator.cli import _common, _positive, _sub

    p = _sub(
        sub,
        "sweep",
        "evaluate a grid of configs (in parallel on Dask) into a resumable table and a Pareto plot",
        "Evaluates every point of a grid (a base config and axes of values: any config field, globally,\n"
        "per op class [op.*], per layer [layer.N.*], per op type or node glob) on a task's split, or a\n"
        "random / Latin-hypercube sample of --max points. Writes OUT/rows.csv and OUT/rows.jsonl (and\n"
        "rows.parquet with pyarrow) one row per point as it finishes: every varied field, accuracy and\n"
        "the task's metrics, drop, agreement, weight compression and bits per weight (block exponents\n"
        "counted), overflow events, worst layer SQNR, wall time. A point already in the table (keyed by\n"
        "a hash of its resolved config, the model's sha256 and the data) is not run again. Then\n"
        "OUT/pareto.png (drop vs compression, front labelled) and OUT/sensitivity.png (per axis).\n"
        "Points run on a local Dask cluster of --workers processes, or an existing --scheduler.",
    )
    from bbct.simulator.cli import _model_arg

    _model_arg(p)
    p.add_argument("--grid", required=True, help="grid TOML: base = PRESET|FILE and [axes] name = [values]")
    p.add_argument("--out", required=True, help="output folder (the table in it is resumed)")
    add_task_args(p)
    p.add_argument("--max", type=_positive, default=None, help="sample this many points instead of the whole grid")
    p.add_argument("--sample", default="lhs", choices=("random", "lhs"), help="how --max points are drawn")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--batch", type=_positive, default=32, help="sentences per batch")
    p.add_argument(
        "--layer-examples", type=_positive, default=16, help="examples whose per-layer SQNR is measured per point"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask worker processes (None: one per core; 0: no Dask, run here)",
    )
    p.add_argument("--scheduler", default=None, help="an existing Dask scheduler, e.g. tcp://127.0.0.1:8786")
    _common(p)
    p.set_defaults(func=cmd_sweep)


# -- search ----------------------------------------------------------------------------------
def _menu(v: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(b), int(k)) for b, k in (item.split("/") for item in v.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: expected BITS/BLOCK pairs, e.g. 3/128,3/64") from None
    if not out:
        raise argparse.ArgumentTypeError("an empty menu")
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from bbct.simulator.cli import _calib_texts, _model
    from bbct.simulator.config import load_config
    from bbct.simulator.explore.grid import base_tables
    from bbct.simulator.explore.search import label, run_search
    from bbct.simulator.explore.sweep import BenchSpec

    if args.budget < 0:
        raise BbctError(f"--budget {args.budget}: the accuracy-drop budget must be >= 0 points")
    base, _ = base_tables(args.base, Path.cwd(), "--base")
    cfg = load_config(dict(base))
    task = task_from_args(args)
    model = _model(args)
    dataset_from_args(args, args.limit)  # the test split must exist before hours of search
    from bbct.simulator.tasks import load_dataset

    load_dataset(task, args.data, args.train_split, args.train_examples)
    calib, source = _calib_texts(args) if cfg.needs_calibration else ([], "")
    common = dict(
        model=str(model.resolve()),
        task=task,
        data=str(Path(args.data).resolve()) if args.data else None,
        calib_texts=tuple(calib),
        calib_source=source,
        max_length=args.max_length,
        batch=args.batch,
        layer_examples=1,
    )
    train = BenchSpec(split=args.train_split, limit=args.train_examples, **common)
    test = BenchSpec(split=args.split, limit=args.limit, **common)
    s = run_search(
        str(model.resolve()),
        base,
        train,
        test,
        Path(args.out),
        args.budget,
        granularity=args.granularity,
        menu=args.menu,
        workers=args.workers,
        scheduler=args.scheduler,
    )
    t = s["test"]
    print(f"\nchosen on {s['train_examples']} train examples ({s['granularity']} granularity): {label(s['chosen'])}")
    print(f"train: drop {s['train']['drop_points']:.2f} points at {s['train']['weight_compression']:.2f}x")
    if t.get("error"):
        raise BbctError(f"the chosen config fails on the test split: {t['error']}")
    print(
        f"test ({t['examples']} examples): float {t['float_accuracy']:.4f}, integer {t['int_accuracy']:.4f}, "
        f"drop {t['drop_points']:.2f} points at {t['weight_compression']:.2f}x "
        f"({t['weight_bits_per_param']:.2f} bits per weight)"
    )
    print(f"config: {s['config']}  (bbct eval --config {s['config']})")
    print(f"report: {Path(args.out) / 'search.json'}")
    return 0


def add_search(sub: Any) -> None:
    from bbct.simulator.cli import _common, _finite, _model_arg, _positive, _sub

    p = _sub(
        sub,
        "search",
        "mixed precision: per-class or per-layer weight formats maximising compression within a drop budget",
        "Finds weight bits and block sizes per op class (or per layer) that maximise weight compression\n"
        "while the accuracy drop stays within --budget points, choosing on a slice of the train split\n"
        "only: each group's sensitivity (KL of the integer class probabilities from the float ones, per\n"
        "byte saved) orders the moves greedily; the largest prefix of them whose measured train drop fits\n"
        "the budget is found by bisection. Writes OUT/search.toml (a config bbct eval takes) and\n"
        "OUT/search.json, then evaluates the winner once on the test split. Every evaluation is a sweep\n"
        "point: resumable, on Dask workers.",
    )
    _model_arg(p)
    p.add_argument("--budget", type=_finite, required=True, help="accuracy drop allowed, in points (0.5 = 0.5 %%)")
    p.add_argument("--target", default="compression", choices=("compression",), help="what to maximise")
    p.add_argument("--base", default="w4a8", help="config every group starts from (preset or TOML file)")
    p.add_argument("--granularity", default="class", choices=("class", "layer"), help="groups of weights")
    p.add_argument("--menu", type=_menu, default="3/128,3/64,3/32,2/64", help="cheaper formats, BITS/BLOCK")
    p.add_argument("--train-split", default="train", help="split the search chooses on (never the test split)")
    p.add_argument("--train-examples", type=_positive, default=512, help="first N examples of --train-split")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    add_task_args(p)
    p.add_argument("--batch", type=_positive, default=32, help="sentences per batch")
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (None: cores; 0: no Dask)")
    p.add_argument("--scheduler", default=None, help="an existing Dask scheduler, e.g. tcp://127.0.0.1:8786")
    _common(p)
    p.set_defaults(func=cmd_search)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a sweep's rows.jsonl."""
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
