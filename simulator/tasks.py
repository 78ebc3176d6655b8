"""Evaluation tasks: GLUE-format TSV readers and the GLUE metrics.

A task reads ``<folder>/<split>.tsv`` in the layout GLUE distributes and yields examples
(text, optional second text, label). Labels are class indices in the order of
:attr:`Task.labels` (the order GLUE fine-tuned classifiers use), or floats for STS-B.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbct.simulator.errors import BbctError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float


@dataclass(frozen=True)
class Task:
    name: str
    text_a: str | int  # header name, or column index for header-less files (CoLA)
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    header: bool = True
    delimiter: str | None = None  # None: "," for a .csv file (quoted fields allowed), else a tab (GLUE, unquoted)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Classes a classifier of this task outputs (1: a regression score)."""
        return 1 if self.labels is None else len(self.labels)


TASKS: dict[str, Task] = {
    "sst-2": Task("sst-2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    "rt-polarity": Task("rt-polarity", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    "cola": Task("cola", 3, None, 1, ("0", "1"), ("matthews", "accuracy"), header=False),
    "mrpc": Task("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1")),
    "sts-b": Task("sts-b", "sentence1", "sentence2", "score", None, ("pearson", "spearman")),
    "qqp": Task("qqp", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1")),
    "mnli": Task(
        "mnli", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"), ("accuracy",)
    ),
    "qnli": Task("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": Task("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",)),
}


def get_task(name: str) -> Task:
    """A GLUE task by name, or a user task from a ``.toml`` task file (see :func:`load_task_file`)."""
    if str(name).endswith(".toml"):
        return load_task_file(name)
    key = name.lower()
    if key not in TASKS:
        raise BbctError(
            f"unknown task {name!r}; known: {', '.join(TASKS)}, or a task FILE.toml, or your own columns "
            "with --text-col/--label-col and --labels or --regression"
        )
    return TASKS[key]


def user_task(
    name: str = "user",
    text: str = "sentence",
    pair: str | None = None,
    label: str = "label",
    labels: list[str] | tuple[str, ...] | None = None,
    regression: bool = False,
    metrics: list[str] | tuple[str, ...] | None = None,
    delimiter: str | None = None,
) -> Task:
    """A task over the user's own file: a header row naming the ``text`` (and ``pair``) and
    ``label`` columns; ``labels`` lists the class names in the order of the model's logits,
    or ``regression`` says the label is a number (one output)."""
    if regression == (labels is not None):
        raise BbctError(f"task {name!r}: give either a label set (--labels a,b,c) or --regression, not both or neither")
    if labels is not None:
        labels = tuple(str(v) for v in labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise BbctError(f"task {name!r}: labels {list(labels)} must be two or more distinct names")
    default = ("pearson", "spearman") if regression else ("accuracy",) if len(labels or ()) > 2 else ("accuracy", "f1")
    metrics = tuple(metrics) if metrics else default
    for m in metrics:
        if m not in METRICS:
            raise BbctError(f"task {name!r}: unknown metric {m!r}; known: {', '.join(METRICS)}")
    return Task(name, text, pair, label, None if regression else labels, metrics, delimiter=delimiter)


TASK_FILE_KEYS = ("name", "text", "pair", "label", "labels", "regression", "metrics", "delimiter")


def load_task_file(path: str | Path) -> Task:
    """A user task from a small TOML file, e.g.::

    name = "sentiment-3"
    text = "sentence"          # column with the text (pair = "..." for a second one)
    label = "label"
    labels = ["neg", "neu", "pos"]   # in the order of the model's logits; or regression = true
    """
    from bbct.simulator.config import read_toml

    p = Path(path)
    data = read_toml(p, "task file")
    unknown = sorted(set(data) - set(TASK_FILE_KEYS))
    if unknown:
        raise BbctError(f"{p}: unknown key(s) {unknown}; known: {', '.join(TASK_FILE_KEYS)}")
    for k in ("name", "text", "pair", "label", "delimiter"):
        if k in data and not isinstance(data[k], str):
            raise BbctError(f"{p}: {k} = {data[k]!r}: expected a string")
    kw = {k: v for k, v in data.items() if k != "name"}
    return user_task(name=data.get("name", p.stem), **kw)


def read_tsv(task: Task, path: str | Path) -> list[Example]:
    """Read a GLUE TSV for ``task``; a missing column or unknown label names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BbctError(f"{path}: no such file")
    csv.field_size_limit(1 << 24)
    out: list[Example] = []
    delim = task.delimiter or ("," if path.suffix.lower() == ".csv" else "\t")
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter=delim, quoting=quoting) if r]
    except UnicodeDecodeError as e:
        raise BbctError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not rows:
        return out
    if task.header:
        header, body, first = rows[0], rows[1:], 2
        idx = {}
        for col in (task.text_a, task.text_b, task.label):
            if col is None:
                continue
            if col not in header:
                raise BbctError(f"{path}: column {col!r} missing (header has {header})")
            idx[col] = header.index(col)
    else:
        body, first = rows, 1
        idx = {c: c for c in (task.text_a, task.text_b, task.label) if c is not None}
    for ln, row in enumerate(body, start=first):
        try:
            a = row[idx[task.text_a]]
            b = row[idx[task.text_b]] if task.text_b is not None else None
            raw = row[idx[task.label]].strip()
        except IndexError:
            raise BbctError(f"{path}:{ln}: expected more columns, got {len(row)}") from None
        if task.labels is None:
            try:
                label = float(raw)
            except ValueError:
                raise BbctError(f"{path}:{ln}: label {raw!r} is not a number") from None
            if not np.isfinite(label):
                raise BbctError(f"{path}:{ln}: label {raw!r} is not a finite number")
        else:
            if raw not in task.labels:
                raise BbctError(f"{path}:{ln}: label {raw!r} not one of {task.labels}")
            label = float(task.labels.index(raw))
        out.append(Example(a, b, label))
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / d) if d else 0.0


METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


def metric(name: str, labels: np.ndarray, preds: np.ndarray) -> float:
    """accuracy, f1 (positive class 1), matthews, pearson or spearman."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(preds, np.float64)
    if name == "accuracy":
        return float(np.mean(y == p)) if y.size else 0.0
    if name in ("f1", "matthews"):
        tp = float(np.sum((p == 1) & (y == 1)))
        tn = float(np.sum((p == 0) & (y == 0)))
        fp = float(np.sum((p == 1) & (y == 0)))
        fn = float(np.sum((p == 0) & (y == 1)))
        if name == "f1":
            return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        d = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return float((tp * tn - fp * fn) / d) if d else 0.0
    if name == "pearson":
        return _pearson(y, p)
    if name == "spearman":
        return _pearson(_rank(y), _rank(p))
    raise BbctError(f"unknown metric {name!r}")


def predictions(task: Task, logits: np.ndarray) -> np.ndarray:
    """Class index per row (argmax), or the regression output for STS-B."""
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(len(logits), -1)[:, 0]
    return np.argmax(logits, axis=-1)


@dataclass(frozen=True)
class Dataset:
    """The examples of one split of a task, as evaluated: texts, optional pairs, labels."""

    task: Task
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray
    source: str  # the file read

    def __len__(self) -> int:
        return len(self.texts)

    def inputs(self, start: int = 0, stop: int | None = None) -> list:
        """Texts (or (text, pair) tuples) of examples ``start:stop``, as the tokenizer takes them."""
        a = self.texts[start:stop]
        return list(zip(a, self.pairs[start:stop], strict=True)) if self.pairs else list(a)

    def digest(self) -> str:
        """sha256 of the task, texts, pairs and labels: the data identity a sweep keys its points by."""
        import hashlib
        import json

        h = hashlib.sha256()
        h.update(json.dumps([self.task.name, self.task.labels, self.texts, self.pairs]).encode())
        h.update(np.asarray(self.labels, np.float64).tobytes())
        return h.hexdigest()


def load_dataset(task: Task, data: str | Path | None, split: str, limit: int | None = None) -> Dataset:
    """The examples of ``split``: the prepared RT data for rt-polarity without ``data``; else
    ``data`` as a file, or ``<data>/<split>.tsv`` (``.csv``) in a folder; the first ``limit``."""
    from bbct.golden.data import read_split
    from bbct.golden.paths import TASK, data_dir

    if task.name == TASK and not data:
        path = data_dir() / f"{split}.tsv"
        texts, labels = read_split(data_dir(), split)
        pairs = None
    else:
        if not data:
            raise BbctError(f"task {task.name} needs --data (a TSV/CSV file, or a folder with {split}.tsv)")
        path = Path(data)
        if path.is_dir():
            path = next(
                (path / f"{split}{e}" for e in (".tsv", ".csv") if (path / f"{split}{e}").is_file()),
                path / f"{split}.tsv",
            )
        ex = read_tsv(task, path)
        texts = [e.text_a for e in ex]
        pairs = [e.text_b or "" for e in ex] if task.text_b is not None else None
        labels = np.array([e.label for e in ex])
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
        pairs = pairs[:limit] if pairs else None
    if not texts:
        raise BbctError(f"{path}: the {split} split of {task.name} has no examples")
    return Dataset(task, list(texts), pairs, labels, str(path))
