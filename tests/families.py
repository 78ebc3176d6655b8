"""Tiny random encoders of every BERT family bbct supports, exported to ONNX for tests.

Each is built from a ``transformers`` config class with random weights (hidden 32, 2 layers,
2 heads, vocabulary 100) — never a real model. Families: BERT, RoBERTa, XLM-RoBERTa,
DistilBERT, ELECTRA (embedding projection), ALBERT (factorized embedding, one layer's weights
shared by every layer) and a sentence-embedding export (BERT encoder + mean pooling over the
mask + L2 normalization). Heads: ``cls`` (the family's sequence-classification head, output
``logits``) or ``base`` (the encoder, ``last_hidden_state``; for ``sentence`` the normalized
embedding ``sentence_embedding``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "sentence")
PAD = {"roberta": 1, "xlm-roberta": 1}  # padding_idx of the families whose positions count from it
HIDDEN, LAYERS, HEADS, FFN, VOCAB = 32, 2, 2, 64, 100


def _config(family: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, max_position_embeddings=72, num_attention_heads=HEADS, num_labels=2)
    if family in ("bert", "sentence"):
        return T.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, **common)
    if family == "roberta":
        return T.RobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, pad_token_id=1, **common
        )
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            intermediate_size=FFN,
            pad_token_id=1,
            type_vocab_size=1,
            **common,
        )
    if family == "distilbert":
        return T.DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=FFN,
            max_position_embeddings=72,
            num_labels=2,
        )
    if family == "electra":
        return T.ElectraConfig(
            embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, **common
        )
    if family == "albert":
        return T.AlbertConfig(
            embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, **common
        )
    raise ValueError(family)


def _model(family: str, head: str, cfg):
    import torch
    import transformers as T

    if family == "sentence":
        enc = T.BertModel(cfg, add_pooling_layer=False)

        class Sentence(torch.nn.Module):  # the sentence-transformers export: mean pool + normalize
            def __init__(self) -> None:
                super().__init__()
                self.enc = enc

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                h = self.enc(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)

        return Sentence()
    cls = {
        "bert": (T.BertModel, T.BertForSequenceClassification),
        "roberta": (T.RobertaModel, T.RobertaForSequenceClassification),
        "xlm-roberta": (T.XLMRobertaModel, T.XLMRobertaForSequenceClassification),
        "distilbert": (T.DistilBertModel, T.DistilBertForSequenceClassification),
        "electra": (T.ElectraModel, T.ElectraForSequenceClassification),
        "albert": (T.AlbertModel, T.AlbertForSequenceClassification),
    }[family][head == "cls"]
    kw = {"add_pooling_layer": False} if head == "base" and family in ("bert", "roberta", "xlm-roberta") else {}
    return cls(cfg, **kw)


def inputs_for(family: str, batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with a start and end token and right padding (row b has b pad tokens), in
    the family's conventions (RoBERTa pads with 1); DistilBERT and XLM-R take no token types."""
    rng = np.random.default_rng(seed)
    pad = PAD.get(family, 0)
    ids = rng.integers(5, VOCAB, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for b in range(batch):
        n = seq - b
        ids[b, 0], ids[b, n - 1] = 2, 3
        ids[b, n:] = pad
        mask[b, n:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if family not in ("distilbert", "xlm-roberta"):
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds


def export_family(
    folder: Path, family: str, head: str = "cls", exporter: str = "torchscript", opset: int = 17, seed: int = 0
) -> Path:
    """Export a tiny random encoder of ``family``; returns the ONNX path (cached in ``folder``).

    A ``tokenizer.json`` (the tiny WordPiece vocabulary of :mod:`bert_exports`) and a
    ``config.json`` labelled ``tiny_random`` lie beside it."""
    import torch
    import transformers
    from bert_exports import tokenizer_json

    transformers.logging.set_verbosity_error()
    out = folder / f"{family}-{head}-{exporter}-op{opset}"
    onnx_path = out / "model.onnx"
    if onnx_path.exists():
        return onnx_path
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _model(family, head, cfg).eval()
    with torch.no_grad():  # random biases and LayerNorm parameters: the import must get each one right
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    f = inputs_for(family, batch=2, seq=6)
    names = list(f)
    args = tuple(torch.tensor(f[k]) for k in names)
    output = {"cls": "logits", "base": "last_hidden_state"}[head] if family != "sentence" else "sentence_embedding"

    class Wrap(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            r = self.m(**kw)
            return r if isinstance(r, torch.Tensor) else r[0]

    kw = dict(input_names=names, output_names=[output], opset_version=opset)
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=64)}
        torch.onnx.export(Wrap(model), args, str(onnx_path), dynamo=True, dynamic_shapes=(dims,) * len(args), **kw)
    else:
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        torch.onnx.export(Wrap(model), args, str(onnx_path), dynamo=False, dynamic_axes=axes, **kw)
    tokenizer_json(out)
    (out / "config.json").write_text(
        json.dumps({"tiny_random": True, "family": family, "head": head, "exporter": exporter, "opset": opset})
    )
    return onnx_path
