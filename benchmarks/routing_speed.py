"""Routing speed benchmark (issue 3): one decision incl. embedding, cache hits, concurrency 32.

    PYTHONPATH=. python benchmarks/routing_speed.py [--n 200] [--max-seq-length N] [--threads T] \
        [--embedder static|PATH]

Prompts are real dataset prompts (``$UNIROUTE_DATASET`` or the repository's ``data/mmlu_pro_27``; else synthetic),
never seen before by the embedder (a fresh cache directory). The policy is a UniRoute
policy over 27 profiled models with K=40 (the rank cost does not depend on the values).
Prints a markdown table; record it in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import numpy as np

import gateway  # noqa: F401  (offline environment)
from routing.artifact import RouterArtifact, UniRoutePolicy
from routing.batcher import MicroBatcher
from routing.embedder import make_embedder
from routing.policy import PoolModel


def prompts(n: int, source: str) -> tuple[list[str], str]:
    from routing.dataset import default_dataset_path, load_dataset

    path = default_dataset_path()
    if source == "dataset" and path is not None and path.is_dir():
        ds = load_dataset(path, with_responses=False)
        rng = np.random.default_rng(123)
        idx = rng.choice(ds.n_prompts, size=min(n, ds.n_prompts), replace=False)
        return [ds.prompts[i] for i in idx], f"{path.name} prompts"
    from routing.synthetic import make_prompts

    return make_prompts(n, seed=7)[0], "synthetic prompts"


def make_policy(variant: str, k: int = 40, d: int = 384, m: int = 27,
                embedder_id: str = "all-MiniLM-L6-v2") -> tuple[UniRoutePolicy, tuple[PoolModel, ...]]:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(k, d))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    art = RouterArtifact(embedder_id=embedder_id, k=k, centroids=mu, theta=rng.normal(size=(d + 1, k)),
                         val_prompt_ids=[], val_prompts=[], val_embeddings=np.zeros((0, d), np.float32),
                         training_set_hash="bench", variant=variant)
    # a tuple, as the gateway's registry snapshot passes it (the policy prepares it once per snapshot)
    pool = tuple(PoolModel(f"model-{j}", float(rng.uniform(1, 100)), rng.uniform(0, 1, size=k)) for j in range(m))
    return UniRoutePolicy(art, variant), pool


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


async def main_async(args: argparse.Namespace) -> None:
    texts, source = prompts(args.n + 32 * args.per_worker + 64, args.source)
    single, conc_texts = texts[: args.n], texts[args.n:]
    embedder_path = args.embedder
    if embedder_path == "static":
        # the distilled folder lives in the real cache dir; embeddings go to the fresh one
        from routing.embedder import default_static_path, distill_static

        embedder_path = str(distill_static(default_static_path()))
    with tempfile.TemporaryDirectory() as cache_dir:
        embedder = make_embedder(embedder_path, cache_dir=cache_dir, max_seq_length=args.max_seq_length,
                                 threads=args.threads, quantize=args.quantize)
        embedder.embed(["warm-up prompt"])  # load the model
        policy, pool = make_policy(args.variant, d=embedder.dim, embedder_id=embedder.id)
        batcher = MicroBatcher(embedder, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)

        # 1. one new prompt at a time, embedding included
        t_new: list[float] = []
        for t in single:
            t0 = time.perf_counter()
            v = await batcher.embed(t)
            policy.rank(v, pool, 0.1)
            t_new.append(time.perf_counter() - t0)
        # 2. the same prompts again: cache hits
        t_hit: list[float] = []
        for t in single:
            t0 = time.perf_counter()
            v = await batcher.embed(t)
            policy.rank(v, pool, 0.1)
            t_hit.append(time.perf_counter() - t0)
        # 3. rank alone
        v = await batcher.embed(single[0])
        t_rank: list[float] = []
        for _ in range(2000):
            t0 = time.perf_counter()
            policy.rank(v, pool, 0.1)
            t_rank.append(time.perf_counter() - t0)
        # 4. concurrency 32, new prompts, micro-batched
        queue = list(conc_texts)
        batches_before = batcher.batches

        async def worker() -> int:
            done = 0
            while queue:
                text = queue.pop()
                vec = await batcher.embed(text)
                policy.rank(vec, pool, 0.1)
                done += 1
            return done

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(32)))
        wall = time.perf_counter() - t0
        n_conc = sum(counts)
        await batcher.aclose()

    ms = 1000.0
    print(f"source: {source}; embedder {embedder.id}; variant {args.variant}; K=40, 27 models; "
          f"max_batch={args.max_batch}, max_wait={args.max_wait_ms} ms, threads={args.threads}")
    print("| measurement | p50 | p90 | p99 | n |")
    print("|---|---|---|---|---|")
    print(f"| new prompt: embed + rank | {pct(t_new, 50) * ms:.2f} ms | {pct(t_new, 90) * ms:.2f} ms | "
          f"{pct(t_new, 99) * ms:.2f} ms | {len(t_new)} |")
    print(f"| cache hit: lookup + rank | {pct(t_hit, 50) * ms:.3f} ms | {pct(t_hit, 90) * ms:.3f} ms | "
          f"{pct(t_hit, 99) * ms:.3f} ms | {len(t_hit)} |")
    print(f"| rank only (pure numpy) | {pct(t_rank, 50) * 1e6:.1f} µs | {pct(t_rank, 90) * 1e6:.1f} µs | "
          f"{pct(t_rank, 99) * 1e6:.1f} µs | {len(t_rank)} |")
    print(f"\nconcurrency 32, new prompts: {n_conc} decisions in {wall:.2f} s = {n_conc / wall:.0f} decisions/s "
          f"({batcher.batches - batches_before} forward passes, mean batch {n_conc / max(1, batcher.batches - batches_before):.1f}); "
          f"mean prompt length {statistics.mean(len(t) for t in single):.0f} chars")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="prompts for the sequential measurements")
    ap.add_argument("--per-worker", type=int, default=20, help="new prompts per worker at concurrency 32")
    ap.add_argument("--source", default="dataset", choices=["dataset", "synthetic"],
                    help="real benchmark prompts (MMLU-Pro, long) or short synthetic prompts")
    ap.add_argument("--variant", default="learnedmap", choices=["kmeans", "learnedmap"])
    ap.add_argument("--max-seq-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize", action="store_true", help="dynamic int8 quantisation of the embedder")
    ap.add_argument("--embedder", default=None,
                    help="'static' (MiniLM distilled, routing.embedder.StaticEmbedder), a static-embedding "
                         "folder, or a sentence-transformers path (default: MiniLM through torch)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
