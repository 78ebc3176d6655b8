"""Tiny random BERTs (hidden 32, 2 layers, 2 heads, vocab 100) exported to ONNX for tests.

These are random-weight models made here for unit tests — never a real model. Exports are
cached per (exporter, opset, attention, activation, head) in a folder per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = [f"w{i}" for i in range(100)]
VOCAB[:5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_json(path: Path) -> Path:
    """A WordPiece tokenizer over the tiny vocabulary, built with HF tokenizers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    p = path / "tokenizer.json"
    tok.save(str(p))
    return p


def export_tiny(
    folder: Path,
    exporter: str = "torchscript",
    opset: int = 17,
    attention: str = "eager",
    act: str = "gelu",
    head: str = "cls",
    seed: int = 0,
) -> Path:
    """Export a tiny random BERT; returns the ONNX path (tokenizer.json beside it)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    name = f"tiny-{exporter}-op{opset}-{attention}-{act}-{head}"
    out = folder / name
    onnx_path = out / "model.onnx"
    if onnx_path.exists():
        return onnx_path
    out.mkdir(parents=True, exist_ok=True)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act=act,
    )
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg) if head == "cls" else transformers.BertModel(cfg)
    # random biases and LayerNorm parameters, so the import must get every one right
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                prm.add_(torch.randn_like(prm) * 0.1)
    model.config._attn_implementation = attention
    model.eval()
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    args = (ids, (ids > 0).long(), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    output = "logits" if head == "cls" else "last_hidden_state"

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    kw = dict(input_names=names, output_names=[output], opset_version=opset)
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=64)}
        torch.onnx.export(
            Wrap(model).eval(), args, str(onnx_path), dynamo=True, dynamic_shapes=(dims, dims, dims), **kw
        )
    else:
        torch.onnx.export(
            Wrap(model).eval(),
            args,
            str(onnx_path),
            dynamo=False,
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
            **kw,
        )
    tokenizer_json(out)
    (out / "config.json").write_text(
        json.dumps(
            {
                "tiny_random_bert": True,
                "exporter": exporter,
                "opset": opset,
                "attention": attention,
                "act": act,
                "head": head,
            }
        )
    )
    return onnx_path


def tiny_inputs(batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with [CLS]/[SEP] and padding, for tiny models."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 100, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for b in range(batch):
        n = seq - b  # row b has b padding tokens
        ids[b, 0], ids[b, n - 1] = 2, 3
        ids[b, n:] = 0
        mask[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
