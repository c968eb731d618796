import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from routing.batcher import MicroBatcher


class SlowEmbedder:
    id = "slow/v1"
    dim = 4

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        import time

        time.sleep(0.01)
        return np.asarray([[len(t), 1, 0, 0] for t in texts], dtype=np.float32)


async def test_concurrent_requests_share_a_batch() -> None:
    inner = SlowEmbedder()
    b = MicroBatcher(inner, max_batch=64, max_wait_ms=5)
    texts = [f"prompt {'x' * i}" for i in range(20)]
    vecs = await asyncio.gather(*(b.embed(t) for t in texts))
    assert all(v[0] == len(t) for v, t in zip(vecs, texts, strict=True))
    assert len(inner.batches) <= 2
    # cached now: no new forward pass
    await b.embed(texts[3])
    assert b.hits == 1 and len(inner.batches) <= 2
    await b.aclose()


async def test_max_batch_splits_and_dedupes() -> None:
    inner = SlowEmbedder()
    b = MicroBatcher(inner, max_batch=4, max_wait_ms=50)
    await asyncio.gather(*(b.embed(t) for t in ["a", "a", "b", "c", "d", "e"]))
    assert inner.batches[0] == ["a", "b", "c"]  # first 4 requests, de-duplicated
    await b.aclose()


async def test_errors_reach_every_waiter() -> None:
    class Broken(SlowEmbedder):
        def embed(self, texts: Sequence[str]) -> np.ndarray:
            raise RuntimeError("boom")

    b = MicroBatcher(Broken(), max_wait_ms=1)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.gather(b.embed("a"), b.embed("b"))
    await b.aclose()


async def test_lru_is_bounded_and_keyed_by_hash() -> None:
    inner = SlowEmbedder()
    b = MicroBatcher(inner, max_batch=8, max_wait_ms=0, lru_size=3)
    texts = [f"{i} " + "long prompt " * 200 for i in range(5)]
    for t in texts:
        await b.embed(t)
    assert len(b._lru) == 3 and all(len(k) == 64 for k in b._lru)  # sha256 hex, never the prompt
    await b.embed(texts[-1])
    assert b.hits == 1
    await b.embed(texts[0])  # evicted: embedded again
    assert len(inner.batches) == 6
    await b.aclose()


async def test_on_lookup_reports_where_each_embedding_came_from(tmp_path: Path) -> None:
    from routing.embedder import CachedEmbedder, EmbeddingCache

    inner = SlowEmbedder()
    CachedEmbedder(inner, EmbeddingCache(inner.id, tmp_path)).embed(["on disk"])
    seen: list[str] = []
    b = MicroBatcher(inner, disk=EmbeddingCache(inner.id, tmp_path), max_wait_ms=0, on_lookup=seen.append)
    await b.embed("on disk")
    await b.embed("new")
    await b.embed("new")
    await b.embed("on disk")
    assert seen == ["disk", "computed", "memory", "memory"]
    await b.aclose()


async def test_disk_cache_is_read_but_never_grown(tmp_path: Path) -> None:
    """The gateway's request path: warm rows are read, new prompts never appended (memory stays flat)."""
    from routing.embedder import CachedEmbedder, EmbeddingCache

    inner = SlowEmbedder()
    CachedEmbedder(inner, EmbeddingCache(inner.id, tmp_path)).embed(["warm"])
    disk = EmbeddingCache(inner.id, tmp_path)
    b = MicroBatcher(inner, disk=disk, max_wait_ms=0)
    out = await asyncio.gather(b.embed("warm"), b.embed("new-1"), b.embed("new-2"))
    assert inner.batches == [["warm"], ["new-1", "new-2"]]  # only the misses, in one pass
    assert np.allclose(np.stack(out), inner.embed(["warm", "new-1", "new-2"]))
    assert len(disk) == 1 and len(EmbeddingCache(inner.id, tmp_path)) == 1
    empty = MicroBatcher(inner, disk=EmbeddingCache(inner.id, tmp_path / "none"), max_wait_ms=0)
    assert (await empty.embed("a")).shape == (4,)
    assert not (tmp_path / "none").exists()
    await b.aclose()
    await empty.aclose()


class ThreadRecordingEmbedder(SlowEmbedder):
    """Records the thread each batch ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import threading

        self.threads.append(threading.current_thread().name)
        return super().embed(texts)


async def test_short_misses_are_embedded_inline_long_ones_and_bursts_in_the_worker() -> None:
    import threading

    inner = ThreadRecordingEmbedder()
    b = MicroBatcher(inner, max_batch=8, max_wait_ms=0, inline_max_chars=20)
    short = await b.embed("short prompt")
    assert short[0] == len("short prompt") and inner.threads == [threading.current_thread().name]
    assert (await b.embed("short prompt"))[0] == short[0] and len(inner.threads) == 1  # remembered in the LRU
    await b.embed("x" * 21)  # longer than inline_max_chars: the worker thread
    assert inner.threads[-1].startswith("embedder")
    # while a batch runs in the worker, a short miss queues for the next batch rather than running inline
    texts = ["y" * 30, "a", "b"]
    vecs = await asyncio.gather(*(b.embed(t) for t in texts))
    assert [v[0] for v in vecs] == [len(t) for t in texts]
    assert all(name.startswith("embedder") for name in inner.threads[2:]), inner.threads
    await b.aclose()
