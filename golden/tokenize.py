"""Tokenization with HF ``tokenizers`` from a model folder's ``tokenizer.json``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bbct.golden.errors import BbctError


@lru_cache(maxsize=8)
def _load(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise BbctError(f"{path}: not a tokenizers JSON file: {e}") from None


def find_tokenizer(model: str | Path) -> Path:
    """``tokenizer.json`` beside an ONNX file, or inside a model folder."""
    p = Path(model)
    cand = p / "tokenizer.json" if p.is_dir() else p.with_name("tokenizer.json")
    if not cand.is_file():
        raise BbctError(f"no tokenizer.json beside {p}")
    return cand


def encode(
    tokenizer: str | Path,
    texts: list[str],
    max_length: int = 128,
    pad_to: int | None = None,
    text_pairs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` for a batch.

    ``texts`` are strings or (text, pair) tuples. Sequences are truncated to ``max_length``
    tokens (:func:`count_truncated` says how many would be) and padded to the longest in the
    batch, or to ``pad_to`` when given.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise BbctError("no text to encode")
    tok = _load(str(tokenizer))
    tok.enable_truncation(max_length=max_length)
    pad_token = next((t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), "[PAD]")
    pad_id = tok.token_to_id(pad_token) or 0
    if pad_to is not None:
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_to)
    else:
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    if text_pairs:
        items = list(zip(texts, text_pairs, strict=True))
    else:
        items = [t if isinstance(t, str) else tuple(t) for t in texts]
    batch = tok.encode_batch(items)
    return {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
    }


def token_counts(tokenizer: str | Path, texts: list, max_length: int | None = None) -> np.ndarray:
    """Tokens of each of ``texts`` (strings or (text, pair) tuples), special tokens included,
    before padding; at most ``max_length`` when given (what :func:`encode` keeps)."""
    tok = _load(str(tokenizer))
    tok.no_truncation()
    tok.no_padding()
    items = [t if isinstance(t, str) else tuple(t) for t in texts]
    n = np.array([len(e.ids) for e in tok.encode_batch(items)], dtype=np.int64)
    return n if max_length is None else np.minimum(n, max_length)


def count_truncated(tokenizer: str | Path, texts: list, max_length: int) -> int:
    """How many of ``texts`` (strings or (text, pair) tuples) are longer than ``max_length`` tokens."""
    return int(np.sum(token_counts(tokenizer, texts) > max_length))
