"""Small generated routing benchmarks with known structure, for tests, demos and benchmarks.

Prompts come from a few topics with disjoint vocabularies, so that any sentence
embedder separates them.  Each model has a per-topic accuracy; scores are drawn
from it.  Multiple-choice answers are letters, and a correct model's recorded
response is the answer letter, so graders can check it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from routing.dataset import write_dataset

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "math": (
        ["integral", "derivative", "polynomial", "matrix", "eigenvalue", "prime", "equation", "logarithm"],
        ["Compute the {a} of the {b} given below.", "Solve for x: the {a} equals the {b}.",
         "What is the {a} when the {b} doubles?"],
    ),
    "biology": (
        ["mitochondria", "enzyme", "chromosome", "protein", "photosynthesis", "neuron", "ribosome", "membrane"],
        ["Which process in the {a} involves the {b}?", "How does the {a} interact with the {b} in a cell?",
         "What role does the {a} play for the {b}?"],
    ),
    "law": (
        ["contract", "tort", "statute", "plaintiff", "jurisdiction", "negligence", "appeal", "precedent"],
        ["Under common law, is the {a} binding when the {b} is disputed?",
         "Which court hears the {a} concerning the {b}?", "Does the {a} create liability for the {b}?"],
    ),
    "history": (
        ["empire", "dynasty", "revolution", "treaty", "monarch", "crusade", "colony", "parliament"],
        ["In which century did the {a} sign the {b}?", "Why did the {a} collapse after the {b}?",
         "Who led the {a} during the {b}?"],
    ),
}
LETTERS = "ABCD"


def make_prompts(n_prompts: int, seed: int = 0, topics: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """Return ``(prompts, categories, answers)``; prompts are unique."""
    rng = np.random.default_rng(seed)
    names = topics or list(TOPICS)
    prompts: list[str] = []
    cats: list[str] = []
    answers: list[str] = []
    seen: set[str] = set()
    k = 0
    while len(prompts) < n_prompts:
        topic = names[k % len(names)]
        k += 1
        words, templates = TOPICS[topic]
        a, b = rng.choice(words, size=2, replace=False)
        stem = templates[int(rng.integers(len(templates)))].format(a=a, b=b)
        opts = [f"{LETTERS[i]}. {rng.choice(words)} {int(rng.integers(1000))}" for i in range(len(LETTERS))]
        text = f"{stem} (item {k})\n" + "\n".join(opts)
        if text in seen:
            continue
        seen.add(text)
        prompts.append(text)
        cats.append(topic)
        answers.append(LETTERS[int(rng.integers(len(LETTERS)))])
    return prompts, cats, answers


def make_synthetic_dataset(
    path: str | os.PathLike[str],
    *,
    n_prompts: int = 200,
    accuracy: dict[str, dict[str, float]] | None = None,
    costs: dict[str, float] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic routing benchmark folder and return its path.

    ``accuracy[model][topic]`` is the probability that ``model`` answers a prompt of
    ``topic`` correctly.  The default pool has a cheap generalist, two cheap
    specialists and an expensive strong model.
    """
    accuracy = accuracy or {
        "small-general": {"math": 0.4, "biology": 0.4, "law": 0.4, "history": 0.4},
        "math-expert": {"math": 0.95, "biology": 0.2, "law": 0.2, "history": 0.2},
        "bio-expert": {"math": 0.2, "biology": 0.95, "law": 0.3, "history": 0.3},
        "large-general": {"math": 0.85, "biology": 0.85, "law": 0.85, "history": 0.85},
    }
    costs = costs or {"small-general": 1.0, "math-expert": 2.0, "bio-expert": 2.0, "large-general": 20.0}
    models = list(accuracy)
    topics = sorted({t for acc in accuracy.values() for t in acc})
    prompts, cats, answers = make_prompts(n_prompts, seed=seed, topics=topics)
    rng = np.random.default_rng(seed + 1)
    scores = np.zeros((n_prompts, len(models)))
    responses: list[list[str]] = []
    for i, (cat, ans) in enumerate(zip(cats, answers, strict=True)):
        row: list[str] = []
        for j, m in enumerate(models):
            ok = rng.random() < accuracy[m].get(cat, 0.0)
            scores[i, j] = 1.0 if ok else 0.0
            wrong = [x for x in LETTERS if x != ans]
            row.append(ans if ok else wrong[int(rng.integers(len(wrong)))])
        responses.append(row)
    return write_dataset(
        path,
        prompt_ids=[f"p{i}" for i in range(n_prompts)],
        prompts=prompts,
        models=models,
        model_costs=[costs[m] for m in models],
        scores=scores,
        responses=responses,
        categories=cats,
        answers=answers,
        description=f"Synthetic routing benchmark: {n_prompts} prompts over topics {topics}, seed {seed}. Cost unit: arbitrary.",
    )
