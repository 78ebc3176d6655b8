"""Run a grid: one row per point, in a table that is written as rows come and resumed.

Points run in parallel on Dask distributed (a local cluster of one worker process per core by
default, or an existing scheduler), or in this process with ``workers=0``. Each worker keeps
one :class:`~bbct.simulator.explore.bench.Bench` per (model, data) for its whole life, so the
model is imported, the split tokenized and its float logits computed once per worker.

Correctness under failures rests on two things: a point's key is a hash of its resolved
config, the model's sha256 and the data (so the same point is the same key wherever and
whenever it runs), and only this process writes the table, keyed by that hash. A point that
Dask re-runs after its worker died is therefore written once; a row that is already in the
table when a sweep starts is not recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbct.golden.atomic import write_text
from bbct.golden.errors import BbctError
from bbct.simulator.config import load_config
from bbct.simulator.errors import ConfigError
from bbct.simulator.explore.grid import Grid, config_key
from bbct.simulator.tasks import Task, load_dataset

# the columns a row carries besides the axes, in table order
RESULT_COLUMNS = (
    "float_accuracy",
    "int_accuracy",
    "drop_points",
    "agreement",
    "weight_compression",
    "weight_bits_per_param",
    "overflow_count",
    "worst_layer_sqnr_db",
    "worst_layer",
    "wall_s",
)


@dataclass(frozen=True)
class BenchSpec:
    """What a worker needs to build its Bench: everything is a plain value, so it pickles."""

    model: str
    task: Task
    data: str | None
    split: str
    limit: int | None
    calib_texts: tuple = ()
    calib_source: str = ""
    max_length: int = 64
    batch: int = 32
    layer_examples: int = 16  # examples whose per-layer SQNR is measured (a traced pass costs memory)

    def ident(self) -> str:
        import hashlib

        blob = repr(
            (self.model, self.task, self.data, self.split, self.limit, self.calib_texts, self.max_length, self.batch)
        )
        return hashlib.sha256(blob.encode()).hexdigest()


# one Bench per spec in each process (a Dask worker process keeps it between tasks)
_BENCHES: dict[str, Any] = {}


def bench_for(spec: BenchSpec) -> Any:
    from bbct.simulator.explore.bench import Bench

    key = spec.ident()
    if key not in _BENCHES:
        data = load_dataset(spec.task, spec.data, spec.split, spec.limit)
        _BENCHES[key] = Bench(
            spec.model,
            data,
            calib_texts=list(spec.calib_texts) or None,
            calib_source=spec.calib_source,
            max_length=spec.max_length,
            batch=spec.batch,
        )
    return _BENCHES[key]


def run_point(spec: BenchSpec, key: str, tables: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one point (in a worker): the row's results, or its error when the config
    cannot be lowered (a bad combination of valid values is a result, not a crash)."""
    t0 = time.time()
    row: dict[str, Any] = {"key": key}
    try:
        ev = bench_for(spec).evaluate(load_config(tables), layer_examples=spec.layer_examples)
        row.update({k: v for k, v in ev.summary.items() if k != "seconds"})
        row["error"] = None
    except (BbctError, ConfigError) as e:  # BbctError covers lowering and config errors
        row["error"] = str(e).splitlines()[0]
    row["wall_s"] = round(time.time() - t0, 3)
    row["worker_pid"] = os.getpid()
    return row


@dataclass
class Table:
    """The sweep's rows, keyed by point; every change rewrites rows.jsonl and rows.csv (and
    rows.parquet when pyarrow is installed) atomically, so a killed sweep leaves a whole table."""

    out: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, out: str | Path) -> Table:
        t = cls(Path(out))
        p = t.out / "rows.jsonl"
        if p.is_file():
            for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise BbctError(f"{p}:{ln}: not a JSON row; move the folder aside or give another --out") from None
                t.rows[row["key"]] = row
        return t

    def done(self, key: str) -> bool:
        r = self.rows.get(key)
        return r is not None and not r.get("error")

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        self.write()

    def write(self) -> None:
        rows = list(self.rows.values())
        write_text(self.out / "rows.jsonl", "".join(json.dumps(_strict(r)) + "\n" for r in rows))
        cols = list(dict.fromkeys(self.columns + [k for r in rows for k in r if k not in ("config",)]))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        write_text(self.out / "rows.csv", buf.getvalue())
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return
        from bbct.golden.atomic import write_with

        flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
        write_with(self.out / "rows.parquet", lambda f: pq.write_table(pa.Table.from_pylist(flat), f))


def _strict(row: dict[str, Any]) -> dict[str, Any]:
    from bbct.golden.atomic import json_safe

    return json_safe(row)


@dataclass
class Sweep:
    """A grid over one model and data: the points to run, their keys and the table."""

    grid: Grid
    spec: BenchSpec
    out: Path
    points: list[tuple] = field(default_factory=list)

    def plan(self) -> list[tuple[str, tuple, dict[str, Any]]]:
        """(key, axis values, config tables) of every point, resolved and validated."""
        from bbct.golden.provenance import model_sha256

        msha = model_sha256(self.spec.model)
        dkey = load_dataset(self.spec.task, self.spec.data, self.spec.split, self.spec.limit).digest()
        # the batch size sets each batch's padding, which a block or matrix exponent can see;
        # "by-length" names how batches are formed, so rows of another batching are not reused
        dkey += "|" + repr((self.spec.calib_texts, self.spec.max_length, self.spec.layer_examples))
        dkey += f"|batch {self.spec.batch} by-length"
        out, seen = [], set()
        for values in self.points:
            tables = self.grid.point(values)
            key = config_key(load_config(tables), msha, dkey)
            if key in seen:  # two axis settings that resolve to the same config run once
                continue
            seen.add(key)
            out.append((key, values, tables))
        return out


def run_sweep(
    sweep: Sweep,
    workers: int | None = None,
    scheduler: str | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    client: Any = None,
) -> Table:
    """Run every point not already in ``sweep.out``'s table; returns the table.

    ``workers=0`` runs in this process; otherwise on Dask: ``client`` if given, else the
    scheduler at ``scheduler``, else a new local cluster of ``workers`` processes (default:
    the number of cores) on the loopback interface."""
    from bbct.golden.progress import progress
    from bbct.golden.provenance import provenance

    table = Table.open(sweep.out)
    table.columns = ["key", "point"] + [a.name for a in sweep.grid.axes] + list(RESULT_COLUMNS)
    plan = sweep.plan()
    todo = [p for p in plan if not table.done(p[0])]
    prov = provenance(sweep.spec.model)
    meta = {
        "model": sweep.spec.model,
        "model_sha256": prov["model_sha256"],
        "bbct_commit": prov["bbct_commit"],
        "bbct_version": prov["bbct_version"],
        "task": sweep.spec.task.name,
    }
    if len(plan) > len(todo):
        print(f"{len(plan) - len(todo)} of {len(plan)} points already in {sweep.out / 'rows.jsonl'}", file=sys.stderr)
    bar = progress(total=len(plan), desc="sweep", unit="point")
    if len(plan) > len(todo):
        bar.update(len(plan) - len(todo))  # the points already in the table count as done

    def record(values: tuple, row: dict[str, Any], tables: dict[str, Any]) -> None:
        row = {
            "key": row["key"],
            "point": sweep.grid.point(values)["name"],
            **{a.name: v for a, v in zip(sweep.grid.axes, values, strict=True)},
            **row,
            **meta,
            "config": tables,
        }
        table.add(row)
        bar.update(1)
        if on_row is not None:
            on_row(row)

    try:
        if not todo:
            table.write()
        elif workers == 0:
            for key, values, tables in todo:
                record(values, run_point(sweep.spec, key, tables), tables)
        else:
            _run_dask(sweep.spec, todo, record, workers, scheduler, client)
    finally:
        bar.close()
    return table


def _client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    """A Dask client of the scheduler at ``scheduler``, or of a new local cluster of
    ``workers`` processes (None: one per core) on the loopback interface; and that cluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BbctError("parallel sweeps need Dask: pip install 'bbct[explore]' (or --workers 0)") from None
    if scheduler:
        if not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise BbctError(f"--scheduler {scheduler!r}: expected an address like tcp://127.0.0.1:8786")
        try:
            return Client(scheduler, timeout="20s"), None
        except OSError as e:
            raise BbctError(f"--scheduler {scheduler}: cannot connect: {e}") from None
    n = workers or os.cpu_count() or 1
    # one single-threaded process per worker: the kernels are Numba/NumPy, the GIL would
    # serialise threads; no memory limit, so a busy shared machine does not restart workers
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, memory_limit=0
    )
    return Client(cluster), cluster


def _run_dask(spec, todo, record, workers, scheduler, client) -> None:
    from distributed import as_completed

    own = client is None
    cluster = None
    if client is None:
        client, cluster = _client(workers, scheduler)
    by_key = {}
    try:
        futures = []
        for key, values, tables in todo:
            # the point's hash is the Dask key: a resubmitted point is the same task, never a twin
            fut = client.submit(run_point, spec, key, tables, key=f"bbct-point-{key}", retries=2)
            by_key[fut.key] = (key, values, tables)
            futures.append(fut)
        for fut in as_completed(futures):
            key, values, tables = by_key[fut.key]
            try:
                row = fut.result()
            except Exception as e:  # the point failed on every retry (e.g. its workers kept dying)
                row = {"key": key, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            record(values, row, tables)
    finally:
        if own:
            client.close()
        if cluster is not None:
            cluster.close()
