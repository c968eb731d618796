"""Micro-batching of prompt embeddings for the gateway's event loop.

``await batcher.embed(text)`` first consults an in-memory LRU and the embedder's disk
cache (both cheap, on the loop). Misses wait at most ``max_wait_ms`` for company, up
to ``max_batch`` texts, and are embedded in ONE worker thread off the event loop, so
concurrent requests share one forward pass. While a forward pass runs, new misses
queue up and go together as the next batch the moment the worker is free (so under
load batches form without any timer, and an idle batcher adds at most ``max_wait_ms``).

``inline_max_chars`` (for an embedder that costs well under a millisecond per short text, the static
one): a miss no longer than this many characters, arriving while no batch is pending or running, is
embedded right on the loop, without the thread hop (handing the text to the worker thread, waking it,
passing the GIL and the result back cost more CPU than the static embedding itself). Longer texts and
misses under load still go to the worker thread.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from routing.embedder import CachedEmbedder, Embedder, EmbeddingCache, text_key


class MicroBatcher:
    """``disk``: an embedding cache to read (never written here); by default the embedder's own when it
    is a :class:`CachedEmbedder`. The gateway passes the bare embedder and a disk cache, so request
    prompts are looked up on disk once, embedded on a miss, and remembered only in the bounded LRU."""

    def __init__(self, embedder: Embedder, *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 lru_size: int = 10_000, on_lookup: Callable[[str], None] | None = None,
                 disk: EmbeddingCache | None = None, inline_max_chars: int = 0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.inline_max_chars = inline_max_chars
        self.lru_size = lru_size
        #: called once per ``embed`` with where the vector came from: "memory", "disk" or "computed"
        self.on_lookup = on_lookup
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._disk: EmbeddingCache | None = disk if disk is not None else (
            embedder.cache if isinstance(embedder, CachedEmbedder) else None)
        self._pending: list[tuple[str, str, asyncio.Future[np.ndarray]]] = []  # (key, text, future)
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self.batches = 0  # number of forward passes (for tests and benchmarks)
        self.hits = 0

    def _remember(self, key: str, vec: np.ndarray) -> None:
        self._lru[key] = vec
        self._lru.move_to_end(key)
        while len(self._lru) > self.lru_size:
            self._lru.popitem(last=False)

    def _cached(self, key: str) -> np.ndarray | None:
        vec = self._lru.get(key)
        if vec is not None:
            self._lru.move_to_end(key)
            if self.on_lookup is not None:
                self.on_lookup("memory")
            return vec
        if self._disk is not None:
            vec = self._disk.get_by_key(key)
            if vec is not None:
                self._remember(key, vec)
                if self.on_lookup is not None:
                    self.on_lookup("disk")
                return vec
        return None

    async def embed(self, text: str) -> np.ndarray:
        # keyed by the text's sha256, not the text: the LRU's memory is bounded whatever the prompt sizes
        key = text_key(text)
        vec = self._cached(key)
        if vec is not None:
            self.hits += 1
            return vec
        if self.on_lookup is not None:
            self.on_lookup("computed")
        if len(text) <= self.inline_max_chars and not self._pending and self._inflight == 0:
            self.batches += 1
            vec = np.asarray(self.embedder.embed([text]), dtype=np.float32)[0]
            self._remember(key, vec)
            return vec
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((key, text, fut))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None and self._inflight == 0:
            self._timer = loop.call_later(self.max_wait, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
        if not batch:
            return
        loop = asyncio.get_running_loop()
        unique = {key: text for key, text, _ in batch}  # de-duplicated, in order
        self.batches += 1
        self._inflight += 1
        job = loop.run_in_executor(self._executor, self.embedder.embed, list(unique.values()))
        job.add_done_callback(lambda j: self._deliver(j, list(unique), batch))

    def _deliver(self, job: asyncio.Future[Any], keys: list[str],
                 batch: list[tuple[str, str, asyncio.Future[np.ndarray]]]) -> None:
        self._inflight -= 1
        if self._pending and self._inflight == 0:
            self._flush()  # what queued up during this pass goes now, as one batch
        if job.cancelled():
            for _, _, fut in batch:
                if not fut.done():
                    fut.cancel()
            return
        exc = job.exception()
        if exc is not None:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        vecs = np.asarray(job.result(), dtype=np.float32)
        by_key = {k: vecs[i] for i, k in enumerate(keys)}
        for k, v in by_key.items():
            self._remember(k, v)
        for k, _, fut in batch:
            if not fut.done():
                fut.set_result(by_key[k])

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=False, cancel_futures=True)
