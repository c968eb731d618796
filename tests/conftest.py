"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from routing.dataset import default_dataset_path


@pytest.fixture(scope="session")
def shared_dataset() -> Path:
    """The shared routing benchmark folder; skips (with the reason) when it is absent."""
    path = default_dataset_path()
    if path is None or not (path / "models.csv").is_file():
        pytest.skip("shared routing benchmark (../shared/data/mmlu_pro_27 or $UNIROUTE_DATASET) is absent")
    return path


@pytest.fixture(scope="session")
def shared_router_artifact(shared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UniRoute artifact fitted on the shared benchmark (embeddings come from the on-disk cache;
    the first run on a machine embeds every prompt once, a few minutes)."""
    from gateway.cli.main import main as cli

    out = tmp_path_factory.mktemp("shared-router") / "artifact"
    assert cli(["router", "fit", "--dataset", str(shared_dataset), "--out", str(out)]) == 0
    return out
