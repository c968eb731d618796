import json
import math
from pathlib import Path

import numpy as np

from routing.evaluation import aggregate, evaluate, markdown_table, plot_curves, sign_test, split_trial


def synthetic(n: int = 600, m: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = 16
    topic = rng.integers(4, size=n)
    x = rng.normal(size=(4, d))[topic] + 0.4 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    acc = rng.uniform(0.1, 0.95, size=(4, m))
    scores = (rng.random((n, m)) < acc[topic]).astype(float)
    return x, scores, rng.uniform(1, 50, size=m)


def test_split_is_disjoint_and_seeded() -> None:
    tr, va, te, mtr, mte = split_trial(1000, 27, 3)
    assert (len(tr), len(va), len(te), len(mtr), len(mte)) == (600, 100, 300, 18, 9)
    assert len(set(tr) | set(va) | set(te)) == 1000 and not set(mtr) & set(mte)
    assert np.array_equal(split_trial(1000, 27, 3)[0], tr)
    assert not np.array_equal(split_trial(1000, 27, 4)[0], tr)


def test_evaluate_on_synthetic(tmp_path: Path) -> None:
    x, scores, costs = synthetic()
    results, summary = evaluate(x, scores, costs, [f"m{j}" for j in range(9)], trials=3, progress=False)
    methods = summary["methods"]
    assert {"uniroute-kmeans", "uniroute-learnedmap", "knn", "zero-router", "clairvoyant", "oracle"} <= set(methods)
    for row in methods.values():
        assert 0 <= row["area"]["mean"] <= 1 and row["area50"]["mean"] <= 0.5
    assert methods["oracle"]["area"]["mean"] >= max(r["area"]["mean"] for r in methods.values()) - 1e-12
    assert methods["uniroute-kmeans"]["area"]["mean"] > methods["random"]["area"]["mean"]
    assert "uniroute-kmeans vs zero-router" in summary["sign_tests"]
    table = markdown_table(summary)
    assert "| uniroute-learnedmap |" in table
    png = plot_curves(results, tmp_path / "curves.png", "synthetic")
    assert png.stat().st_size > 1000
    json.dumps(aggregate(results), default=float)


def test_sign_test() -> None:
    t = sign_test([1.0] * 20, [0.0] * 20)
    assert t["wins"] == 20 and t["p"] < 1e-5
    assert sign_test([1.0, 0.0], [1.0, 0.0])["p"] == 1.0
    assert math.isclose(sign_test([1, 0, 1, 0], [0, 1, 0, 1])["p"], 1.0)


def test_real_dataset_eval_one_trial(shared_dataset: Path) -> None:
    """One trial on the repository's benchmark with the demo's static embedder: seconds, even on a
    cold cache once the static embedding is distilled (MiniLM: 10-30 min to embed the prompts)."""
    from routing.dataset import load_dataset
    from routing.embedder import make_embedder

    ds = load_dataset(shared_dataset, with_responses=False)
    rows = make_embedder("static").embed(ds.prompts)
    _, summary = evaluate(rows, ds.scores, ds.model_costs, ds.models, trials=1, progress=False,
                          methods=["zero-router", "uniroute-kmeans"])
    assert summary["methods"]["uniroute-kmeans"]["area"]["mean"] > 0.45
