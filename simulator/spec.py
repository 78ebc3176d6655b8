"""The BERT structure recognised in an ONNX graph, in float, before lowering to integers.

The importer (:mod:`bbct.simulator.onnx_import`) fills these frozen records from any supported
ONNX export; lowering (:mod:`bbct.simulator.lower`) turns them into the integer IR. Weights are
float32 numpy arrays exactly as stored in the ONNX file (``Linear.weight`` is laid out
``(in_features, out_features)``, i.e. ``y = x @ weight + bias``).

Every record keeps the ONNX tensor names of the values it produces (``names``), so the
simulator can compare each integer tensor with the float golden of the same name. A role
that the export does not materialise as a separate tensor (fused ops) is simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Roles under which a record names its ONNX tensors (keys of the ``names`` dicts).
ROLE_OUT = "out"  # the record's main output
ROLE_SCORES = "scores"  # attention: scaled QK^T plus mask, before softmax
ROLE_PROBS = "probs"  # attention: softmax output
ROLE_CONTEXT = "context"  # attention: probs @ V merged back to (batch, seq, hidden)
ROLE_Q = "q"
ROLE_K = "k"
ROLE_V = "v"


@dataclass(frozen=True, eq=False)
class Linear:
    """``y = x @ weight + bias``; weight ``(in, out)`` float32, bias ``(out,)`` or None."""

    weight: np.ndarray
    bias: np.ndarray | None
    names: dict[str, str] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True, eq=False)
class LayerNorm:
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta`` over the last axis."""

    gamma: np.ndarray
    beta: np.ndarray
    eps: float
    names: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Embeddings:
    """word[ids] + position[arange(seq)] + token_type[type_ids], then LayerNorm."""

    word: np.ndarray  # (vocab, hidden)
    position: np.ndarray  # (max_positions, hidden)
    token_type: np.ndarray | None  # (type_vocab, hidden)
    layer_norm: LayerNorm
    position_offset: int = 0  # first position id used (0 for BERT)
    names: dict[str, str] = field(default_factory=dict)  # ROLE_OUT: sum before LayerNorm


@dataclass(frozen=True, eq=False)
class Attention:
    """Multi-head self-attention: softmax(Q K^T * scale + mask) V, then the output projection."""

    q: Linear
    k: Linear
    v: Linear
    out: Linear
    num_heads: int
    scale: float  # multiplies Q K^T (1/sqrt(head_dim) in BERT), wherever the export applies it
    mask_value: float  # additive mask for padded keys (e.g. -10000.0 or float32 min)
    names: dict[str, str] = field(default_factory=dict)  # ROLE_SCORES/ROLE_PROBS/ROLE_CONTEXT


@dataclass(frozen=True, eq=False)
class EncoderLayer:
    attention: Attention
    attention_norm: LayerNorm  # LayerNorm(x + attention(x))
    intermediate: Linear  # hidden -> ffn
    activation: str  # "gelu_erf" or "gelu_tanh"
    output: Linear  # ffn -> hidden
    output_norm: LayerNorm  # LayerNorm(h + output(gelu(intermediate(h))))
    names: dict[str, str] = field(default_factory=dict)  # ROLE_OUT: activation output


@dataclass(frozen=True, eq=False)
class BertSpec:
    """A whole BERT: embeddings, encoder layers, optional pooler and classifier head.

    ``inputs`` maps a role (``input_ids``, ``attention_mask``, ``token_type_ids``) to the
    ONNX graph input name; ``outputs`` maps an ONNX graph output name to a role
    (``last_hidden_state``, ``pooler_output`` or ``logits``).
    """

    embeddings: Embeddings
    layers: tuple[EncoderLayer, ...]
    pooler: Linear | None  # dense on the [CLS] token, followed by tanh
    classifier: Linear | None  # on the pooler output
    inputs: dict[str, str]
    outputs: dict[str, str]
    opset: int = 0
    producer: str = ""
    names: dict[str, str] = field(default_factory=dict)  # "pooler_tanh": tanh output name

    @property
    def hidden(self) -> int:
        return int(self.embeddings.word.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.embeddings.word.shape[0])

    @property
    def num_heads(self) -> int:
        return self.layers[0].attention.num_heads if self.layers else 0
