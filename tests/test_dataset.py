from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from routing.dataset import DatasetError, default_dataset_path, load_dataset
from routing.synthetic import make_synthetic_dataset


def test_roundtrip_synthetic(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "d", n_prompts=40)
    ds = load_dataset(tmp_path / "d")
    assert ds.n_prompts == 40
    assert ds.n_models == 4
    assert ds.scores.shape == (40, 4)
    assert set(np.unique(ds.scores)) <= {0.0, 1.0}
    assert len(ds.fingerprint()) == 64
    # a correct model's recorded response is the gold letter
    i = 0
    for j in range(ds.n_models):
        assert (ds.responses[i][j] == ds.answers[i]) == (ds.scores[i, j] == 1.0)


def _rewrite_outcomes(root: Path, transform: Callable[[list[str]], list[str]]) -> None:
    p = root / "outcomes.csv.gz"
    with gzip.open(p, "rt") as src:
        lines = src.read().splitlines()
    lines = transform(lines)
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("transform", "needle"),
    [
        (lambda ls: [*ls, ls[1]], "outcomes.csv.gz:42: duplicate outcome"),
        (lambda ls: ls[:-1], "outcomes missing"),
        (lambda ls: [ls[0], ls[1].replace(",1,", ",nan,").replace(",0,", ",nan,"), *ls[2:]], "outcomes.csv.gz:2: score"),
        (lambda ls: [ls[0], ls[1].replace(",1,", ",1.5,").replace(",0,", ",1.5,"), *ls[2:]], "outcomes.csv.gz:2: score"),
        (lambda ls: [ls[0], "zzz" + ls[1], *ls[2:]], "outcomes.csv.gz:2: unknown prompt_id"),
    ],
)
def test_refuses_broken_outcomes(tmp_path: Path, transform: Callable[[list[str]], list[str]], needle: str) -> None:
    root = make_synthetic_dataset(tmp_path / "d", n_prompts=10)
    _rewrite_outcomes(root, transform)
    with pytest.raises(DatasetError, match=needle.replace("(", r"\(")):
        load_dataset(root)


def test_refuses_duplicate_prompt_id(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", n_prompts=5)
    p = root / "prompts.jsonl.gz"
    with gzip.open(p, "rt") as src:
        lines = src.read().splitlines()
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(DatasetError, match=r"prompts.jsonl.gz:6: duplicate prompt id"):
        load_dataset(root)


def test_refuses_bad_model_cost(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", n_prompts=5)
    text = (root / "models.csv").read_text().replace("small-general,1,", "small-general,-1,")
    (root / "models.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"models.csv:2: cost of 'small-general' must be > 0"):
        load_dataset(root)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(tmp_path / "nope")


@pytest.mark.data
def test_shared_mmlu_pro_27(shared_dataset: Path) -> None:
    ds = load_dataset(shared_dataset, with_responses=False)
    assert ds.n_models >= 2
    assert ds.n_prompts > 100


def test_default_dataset_is_the_repository_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without $UNIROUTE_DATASET the default is data/mmlu_pro_27 inside the repository (no sibling folder)."""
    from routing.dataset import DATASET_ENV

    monkeypatch.delenv(DATASET_ENV, raising=False)
    path = default_dataset_path()
    assert path is not None and path == Path(__file__).resolve().parent.parent / "data" / "mmlu_pro_27"
    ds = load_dataset(path, with_responses=False)
    assert (ds.n_prompts, ds.n_models) == (10308, 27)
    monkeypatch.setenv(DATASET_ENV, str(tmp_path))
    assert default_dataset_path() == tmp_path
