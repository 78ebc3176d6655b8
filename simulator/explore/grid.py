"""Sweep grids: a base config and axes of values, expanded into points (every combination,
or a random / Latin-hypercube sample of them).

A grid file (TOML)::

    base = "w4a8"                      # a preset or a config TOML file (relative to the grid)
    [axes]
    weight_bits = [3, 4, 6, 8]         # [default] weight_bits: every quantization point
    weight_block = [32, 64, 128]
    op.intermediate.weight_bits = [4, 8]       # [op.intermediate]
    layer.0.query.weight_bits = [4, 8]         # [layer.0.query]
    optype.softmax.softmax_method = ["poly", "lut"]
    node."L5.ffn*".weight_bits = [4, 8]        # [node."L5.ffn*"]

``[base]`` may also be a table written like a config file (``[base.default]``, ``[base.op.*]``).
An axis is named by its dotted path (``op.intermediate.weight_bits``); each point's config is
the base with the axis values set, validated like any config file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbct.simulator.config import OP_CLASSES, PRESETS, Config, load_config, read_toml
from bbct.simulator.errors import ConfigError

SELECTORS = ("op", "layer", "optype", "node")


@dataclass(frozen=True)
class Axis:
    name: str  # dotted, e.g. "op.intermediate.weight_bits"
    path: tuple[str, ...]  # config table path then the key: ("op", "intermediate", "weight_bits")
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Grid:
    base: dict[str, Any]  # config tables of the base
    base_name: str
    axes: tuple[Axis, ...]

    @property
    def size(self) -> int:
        return int(np.prod([len(a.values) for a in self.axes])) if self.axes else 1

    def point(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """The config tables of the point with one value per axis."""
        d = copy.deepcopy(self.base)
        for axis, v in zip(self.axes, values, strict=True):
            *tables, key = axis.path
            t = d.setdefault("default", {}) if not tables else d
            for name in tables:
                t = t.setdefault(name, {})
            t[key] = v
        d["name"] = point_name(self, values)
        return d

    def points(self, max_points: int | None = None, sample: str = "lhs", seed: int = 0) -> list[tuple[Any, ...]]:
        """Every combination in grid order, or ``max_points`` of them drawn by ``sample``
        (``random``: uniformly without replacement; ``lhs``: a Latin hypercube over the axes'
        value indices, so each axis's values are covered evenly; duplicates dropped)."""
        full = list(itertools.product(*[a.values for a in self.axes]))
        if max_points is None or max_points >= len(full):
            return full
        rng = np.random.default_rng(seed)
        if sample == "random":
            return [full[i] for i in sorted(rng.choice(len(full), size=max_points, replace=False))]
        if sample != "lhs":
            raise ConfigError(f"--sample {sample!r}: expected random or lhs")
        cols = []
        for a in self.axes:  # stratum i of N maps to value floor((i + u) / N * len(values))
            strata = (rng.permutation(max_points) + rng.random(max_points)) / max_points
            cols.append(np.minimum((strata * len(a.values)).astype(int), len(a.values) - 1))
        out: list[tuple[Any, ...]] = []
        for idx in zip(*cols, strict=True):
            p = tuple(a.values[i] for a, i in zip(self.axes, idx, strict=True))
            if p not in out:
                out.append(p)
        return out


def point_name(grid: Grid, values: tuple[Any, ...]) -> str:
    """A short readable label of a point: ``weight_bits=4,weight_block=64``."""
    return ",".join(f"{a.name}={v}" for a, v in zip(grid.axes, values, strict=True)) or grid.base_name


def _axes(table: dict[str, Any], prefix: tuple[str, ...], where: Path) -> list[Axis]:
    out = []
    for k, v in table.items():
        path = prefix + (str(k),)
        if isinstance(v, dict):
            out += _axes(v, path, where)
            continue
        name = ".".join(f'"{p}"' if "." in p or "*" in p else p for p in path)
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where}: axis {name} = {v!r}: expected a non-empty list of values")
        if len(set(map(repr, v))) != len(v):
            raise ConfigError(f"{where}: axis {name} repeats a value: {v}")
        out.append(Axis(name, path, tuple(v)))
    return out


def _check_axis(axis: Axis, where: Path) -> None:
    p = axis.path
    head = p[0]
    shapes = {"op": 3, "layer": 4, "optype": 3, "node": 3}
    if head in SELECTORS and len(p) != shapes[head]:
        form = {
            "op": "op.CLASS.key",
            "layer": "layer.N.CLASS.key",
            "optype": "optype.OP.key",
            "node": 'node."GLOB".key',
        }
        raise ConfigError(f"{where}: axis {axis.name}: expected {form[head]}")
    if head not in SELECTORS and len(p) != 1:
        raise ConfigError(f"{where}: axis {axis.name}: expected a setting, or one of {', '.join(SELECTORS)}")
    if head == "op" and p[1] not in OP_CLASSES:
        raise ConfigError(f"{where}: axis {axis.name}: unknown op class {p[1]!r}; known: {', '.join(OP_CLASSES)}")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file: every point's config is validated now, before any runs."""
    p = Path(path)
    data = read_toml(p, "grid")
    unknown = sorted(set(data) - {"base", "axes"})
    if unknown:
        raise ConfigError(f"{p}: unknown top-level key(s) {unknown}; a grid has 'base' and [axes]")
    tables, name = base_tables(data.get("base", "w8a8"), p.parent, f"{p}: base")
    load_config(dict(tables))  # the base alone must be a valid config
    axes_t = data.get("axes", {})
    if not isinstance(axes_t, dict):
        raise ConfigError(f"{p}: axes must be a table [axes]")
    axes = tuple(_axes(axes_t, (), p))
    for a in axes:
        _check_axis(a, p)
    grid = Grid(tables, name, axes)
    for a in axes:  # each value once, on the base: a bad value names its axis
        for v in a.values:
            try:
                load_config(Grid(tables, name, (a,)).point((v,)))
            except ConfigError as e:
                raise ConfigError(f"{p}: axis {a.name} = {v!r}: {e}") from None
    return grid


def base_tables(base: Any, folder: Path, where: str) -> tuple[dict[str, Any], str]:
    """Config tables and name of a base: a preset name, a config TOML file (relative to
    ``folder``) or a table of config tables."""
    if isinstance(base, str):
        if base in PRESETS:
            return {"preset": base}, base
        f = Path(base) if Path(base).is_absolute() else folder / base
        if not f.is_file():
            raise ConfigError(f"{where} = {base!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        return read_toml(f, "config"), f.stem
    if isinstance(base, dict):
        return base, str(base.get("name", "base"))
    raise ConfigError(f"{where} = {base!r}: expected a preset name, a config file or a table")


def config_key(cfg: Config, model_sha256: str, data_key: str) -> str:
    """The identity of a point: the resolved config (its name left out), the model and the data."""
    d = cfg.to_dict()
    d.pop("name", None)
    blob = json.dumps([d, model_sha256, data_key], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
