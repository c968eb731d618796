"""docs/CONFIG.md is the generated config reference, so the documented defaults are the code's."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from gateway.cli.main import main as cli
from gateway.config import GatewayConfig
from gateway.configdoc import UndocumentedField, render, rows, sections

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_docs_config_md_is_the_generated_reference() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/CONFIG.md is stale: run `uniroute config reference > docs/CONFIG.md`")


def test_every_key_of_every_section_is_documented_with_its_real_default() -> None:
    text = render()
    models: list[tuple[str, type[BaseModel]]] = [("", GatewayConfig)]
    models += [(key + ".", model) for key, _, model in sections(GatewayConfig)]
    for prefix, model in models:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            assert f"`{prefix}{name}`" in text or f"## `{prefix}{name}" in text, f"{prefix}{name} missing"
    defaults = {k: d for k, _, d, _ in rows(type(GatewayConfig().server), "server.")}
    assert defaults["`server.port`"] == f"`{GatewayConfig().server.port}`"
    assert "`auth.mode` | `open` \\| `keys` | `keys`" in text  # the one default of auth.mode


def test_a_field_without_a_description_is_refused() -> None:
    class Section(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)

        documented: int = 1
        """Has one."""
        bare: int = 2

    with pytest.raises(UndocumentedField, match="bare"):
        list(rows(Section))


def test_the_cli_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["config", "reference"]) == 0
    assert capsys.readouterr().out == render()
