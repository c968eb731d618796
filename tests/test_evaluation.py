import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from routing.evaluation import (
    HEADLINE,
    REPORT_SEED0,
    aggregate,
    evaluate,
    evaluate_sizes,
    markdown_table,
    plot_curves,
    plot_sizes,
    sign_test,
    sizes_table,
    split_trial,
    validation_subset,
)


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
    assert f"| **{HEADLINE}** (headline) |" in table and "| uniroute-kmeans |" in table
    assert summary["seeds"] == [REPORT_SEED0, REPORT_SEED0 + 1, REPORT_SEED0 + 2]  # the reporting seeds
    assert next(iter(summary["sign_tests"])) == f"{HEADLINE} vs knn"  # the headline's tests come first
    png = plot_curves(results, tmp_path / "curves.png", "synthetic")
    assert png.stat().st_size > 1000
    json.dumps(aggregate(results), default=float)


def test_sign_test() -> None:
    t = sign_test([1.0] * 20, [0.0] * 20)
    assert t["wins"] == 20 and t["p"] < 1e-5
    assert sign_test([1.0, 0.0], [1.0, 0.0])["p"] == 1.0
    assert math.isclose(sign_test([1, 0, 1, 0], [0, 1, 0, 1])["p"], 1.0)


def test_sign_test_tie_tolerance() -> None:
    """Differences within the tolerance are ties (dropped), not wins: 20 trials a hair apart prove nothing."""
    a, b = [0.5 + 5e-5] * 20, [0.5] * 20
    t = sign_test(a, b)
    assert (t["wins"], t["losses"], t["ties"], t["p"]) == (0, 0, 20, 1.0)
    assert sign_test(a, b, tol=0.0)["wins"] == 20  # without a tolerance they would be 20 wins
    t = sign_test([0.5 + 2e-4] * 15 + [0.5 - 2e-4] * 2 + [0.5] * 3, [0.5] * 20, tol=1e-4)
    assert (t["wins"], t["losses"], t["ties"]) == (15, 2, 3)
    assert t["p"] == pytest.approx(binomtest(15, 17, 0.5).pvalue)


def test_validation_subsets_are_nested_and_bounded() -> None:
    va = np.arange(100, 200)
    small, big = validation_subset(va, 7, 20), validation_subset(va, 7, 60)
    assert len(small) == 20 and len(big) == 60 and set(small) <= set(big) <= set(va)
    assert np.array_equal(validation_subset(va, 7, None), va)
    with pytest.raises(ValueError, match=r"1\.\.100"):
        validation_subset(va, 7, 101)


def test_label_efficiency_on_synthetic(tmp_path: Path) -> None:
    x, scores, costs = synthetic()
    methods = ["zero-router", "knn", "uniroute-kmeans", HEADLINE]
    by_size, summary = evaluate_sizes(x, scores, costs, [f"m{j}" for j in range(9)], val_sizes=[30, 60],
                                      trials=2, methods=methods, progress=False)
    assert summary["val_sizes"] == [30, 60] and set(by_size) == {30, 60}
    for n, results in by_size.items():
        assert [r.info["val_size"] for r in results] == [n, n]
        assert [r.info["test_models"] for r in results] == [r.info["test_models"] for r in by_size[60]]  # paired
    # the prompt-agnostic router only sees fewer labels; the test prompts and LLMs are the same
    assert summary["headline_vs_largest"]["60"]["delta_mean"] == 0.0
    table = sizes_table(summary)
    assert "| n = 30 | n = 60 |" in table and f"| **{HEADLINE}** (headline) |" in table
    assert f"| {HEADLINE} vs zero-router |" in table
    png = plot_sizes(summary, tmp_path / "sizes.png", "synthetic")
    assert png.stat().st_size > 1000


def test_eval_cli_val_sizes_on_a_tiny_dataset(tmp_path: Path) -> None:
    """`uniroute eval --val-sizes` end to end: a tiny benchmark folder, a tiny static embedder."""
    from gateway.cli.main import main as cli
    from routing.dataset import write_dataset
    from routing.synthetic import make_prompts
    from tests.static_model import make_tiny_static

    prompts, cats, _ = make_prompts(300, seed=0)
    rng = np.random.default_rng(0)
    topics = sorted(set(cats))
    acc = rng.uniform(0.2, 0.9, size=(len(topics), 6))
    scores = np.array([[float(rng.random() < acc[topics.index(c), j]) for j in range(6)] for c in cats])
    models = [f"m{j}" for j in range(6)]
    data = tmp_path / "data"
    write_dataset(data, prompt_ids=[f"p{i}" for i in range(300)], prompts=prompts, models=models,
                  model_costs=[1.0, 2, 3, 5, 8, 13], scores=scores)
    static = make_tiny_static(tmp_path / "static")
    out = tmp_path / "eval.json"
    png = tmp_path / "sizes.png"
    assert cli(["eval", "--dataset", str(data), "--embedder", str(static), "--cache-dir", str(tmp_path / "cache"),
                "--trials", "2", "--val-sizes", "10,30", "--methods", f"zero-router,knn,{HEADLINE}",
                "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["val_sizes"] == [10, 30] and doc["seeds"] == [REPORT_SEED0, REPORT_SEED0 + 1]
    assert set(doc["by_size"]["10"]["methods"]) >= {"zero-router", "knn", HEADLINE}
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit, match=r"not in 1\.\.30"):
        cli(["eval", "--dataset", str(data), "--embedder", str(static), "--cache-dir", str(tmp_path / "cache"),
             "--trials", "1", "--val-sizes", "10,31", "--methods", "zero-router"])


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


def test_active_profiling_in_a_trial_spends_the_same_label_budget() -> None:
    """Issue 15: at validation size n the active variants read n labels per new model (chosen among all the
    trial's validation prompts), as many as the uniform subset the other routers get."""
    from routing.evaluation import run_trial

    x, scores, costs = synthetic()
    methods = [HEADLINE, "uniroute-learnedmap-active", "uniroute-learnedmap-active-disagree",
               "uniroute-learnedmap-active-uniform"]
    res = run_trial(x, scores, costs, [f"m{j}" for j in range(9)], 3, methods, val_size=25)
    for name in methods[1:]:
        assert res.info[f"{name}.labels_used_"] == [25, 25, 25]
        assert 0 < res.metrics[name]["area"] <= 1
    assert f"{HEADLINE}.labels_used_" not in res.info
