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
    key = name.lower()
    if key not in TASKS:
        raise BbctError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def read_tsv(task: Task, path: str | Path) -> list[Example]:
    """Read a GLUE TSV for ``task``; a missing column or unknown label names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BbctError(f"{path}: no such file")
    csv.field_size_limit(1 << 24)
    out: list[Example] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
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
