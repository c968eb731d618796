"""The README's client examples run as written (issue 12, point 7: "a section per client with copy-paste examples").

Every ```python block of the README (the OpenAI SDK's chat completions, plain and streamed; its Responses API and
embeddings; the Anthropic SDK's messages, plain and streamed) is run, unchanged but for the gateway's address, in
a subprocess against a real ``uniroute serve`` (open mode, as the demo) in front of the replay upstream. The
embedding model the README names is the demo config's; the test's config has an entry of the same name.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from gateway.config import load_config
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import ROOT, free_port, gateway_server, replay_server, running_all, server_env

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
DEMO = "http://127.0.0.1:8000"


def test_the_readme_has_an_example_per_client() -> None:
    code = "\n".join(BLOCKS)
    for call in ("chat.completions.create", "responses.create", "embeddings.create", "messages.create",
                 "messages.stream"):
        assert call in code, call
    assert all(DEMO in block for block in BLOCKS)
    # the embedding model the README names is in the demo's config.yaml
    named = set(re.findall(r'embeddings\.create\(model="([^"]+)"', code))
    demo = {m.name for m in load_config(ROOT / "config.yaml").models if m.kind == "embedding"}
    assert named and named <= demo, (named, demo)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("readme")
    dataset = make_dataset(root)
    replay, replay_base = replay_server(dataset, *replay_args())
    port = free_port()
    cfg = write_config(root, dataset, replay_base, port=port, log_level="warning")
    data = yaml.safe_load(cfg.read_text())
    data.update(database_url=f"sqlite:///{root / 'gw.db'}", database={"spill_dir": str(root / "spill")})
    for model in load_config(ROOT / "config.yaml").models:
        if model.kind == "embedding":
            data["models"].append({"name": model.name, "kind": "embedding", "router_cost": 1,
                                   "litellm_params": {"model": f"openai/{model.name}", "api_base": replay_base,
                                                      "api_key": "replay"}})
    cfg.write_text(yaml.safe_dump(data))
    with running_all(replay, gateway_server(cfg, env=server_env())):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs_as_written(base: str, index: int) -> None:
    code = BLOCKS[index].replace(DEMO, base)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=server_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (BLOCKS[index], done.stdout[-2000:], done.stderr[-3000:])
    assert done.stdout.strip(), "the example printed nothing"
