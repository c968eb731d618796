"""End to end: `uniroute serve` (real uvicorn) → LiteLLM → `uniroute replay`, driven by the official OpenAI SDK."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from routing.dataset import BenchmarkDataset, load_dataset
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import free_port, gateway_server, python, replay_server, running_all


@dataclass
class Stack:
    base_url: str  # the gateway's /v1
    data: BenchmarkDataset


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    dataset = make_dataset(root)
    replay, replay_base = replay_server(dataset, *replay_args())
    port = free_port()
    cfg = write_config(root, dataset, replay_base, port=port)
    with running_all(replay, gateway_server(cfg)):  # both start at once
        yield Stack(f"http://127.0.0.1:{port}/v1", load_dataset(dataset))


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as c:
        yield c


def _recorded(stack: Stack, model: str, i: int = 0) -> str:
    return f"The answer is ({stack.data.responses[i][stack.data.models.index(model)]})."


def test_sync_named_model(client: openai.OpenAI, stack: Stack) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="large-general", messages=[{"role": "user", "content": stack.data.prompts[0]}], temperature=0.2,
        max_tokens=64, seed=1)
    completion = raw.parse()
    assert completion.model == "large-general"
    assert completion.choices[0].message.content == _recorded(stack, "large-general")
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-uniroute-model"] == "large-general"
    assert float(raw.headers["x-uniroute-cost"]) > 0
    ext = (completion.model_extra or {})["uniroute"]
    assert ext["request_id"] == raw.headers["x-uniroute-request-id"]
    assert ext["requested_model"] == "large-general" and ext["cost_usd"] > 0


def test_sync_auto(client: openai.OpenAI, stack: Stack) -> None:
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": stack.data.prompts[1]}],
        extra_body={"uniroute": {"lambda": 0.5}})
    # the placeholder policy ranks by cost: bad-500 (fails upstream) then small-general
    assert completion.model == "small-general"
    assert completion.choices[0].message.content == _recorded(stack, "small-general", 1)
    ext = (completion.model_extra or {})["uniroute"]
    assert ext["lambda"] == 0.5 and [a["model"] for a in ext["attempts"]] == ["bad-500", "small-general"]
    assert ext["candidates"][0]["model"] == "bad-500"


@pytest.mark.parametrize("model", ["auto", "large-general"])
def test_sync_stream_with_usage(client: openai.OpenAI, stack: Stack, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": stack.data.prompts[2]}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    served = "small-general" if model == "auto" else model
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _recorded(stack, served, 2)
    assert {c.model for c in chunks} == {served}
    last = chunks[-1]
    assert last.usage is not None and last.usage.total_tokens > 0
    assert (last.model_extra or {})["uniroute"]["model"] == served
    assert (last.model_extra or {})["uniroute"]["cost_usd"] > 0


async def test_async_named_and_auto(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as c:
        named = await c.chat.completions.create(
            model="small-general", messages=[{"role": "user", "content": stack.data.prompts[3]}])
        assert named.choices[0].message.content == _recorded(stack, "small-general", 3)
        auto = await c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "unseen?"}])
        assert auto.model == "small-general"
        assert "no recording" in (auto.choices[0].message.content or "").lower()


async def test_async_stream_without_usage(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": stack.data.prompts[4]}], stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(ch.usage is None for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == _recorded(
        stack, "small-general", 4)
    assert (chunks[-1].model_extra or {})["uniroute"]["cost_usd"] > 0


def test_models_via_sdk(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "auto" and "large-general" in ids
    assert client.models.retrieve("large-general").id == "large-general"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [("gpt-99", openai.NotFoundError, 404), ("bad-429", openai.RateLimitError, 429),
     ("bad-500", openai.APIStatusError, 502), ("bad-timeout", openai.APIStatusError, 504)],
)
def test_sdk_sees_openai_errors(client: openai.OpenAI, model: str, error: type[openai.APIStatusError],
                                status: int) -> None:
    with pytest.raises(error) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == status


def test_bad_request_over_http(stack: Stack) -> None:
    r = httpx.post(f"{stack.base_url}/chat/completions", json={"model": "auto", "messages": [],
                                                                "temperature": 9})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{stack.base_url}/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_serve_rejects_bad_config(tmp_path: Path) -> None:

    from tests.procs import ROOT, server_env

    bad = tmp_path / "c.yaml"
    bad.write_text("replay_models: {dataset: /nonexistent}\n")
    proc = python(["-m", "gateway.cli.main", "serve", "--config", str(bad)], cwd=ROOT, env=server_env(), timeout=60)
    assert proc.returncode == 2 and "UNIROUTE_DATASET" in proc.stderr


@pytest.mark.data
@pytest.mark.slow  # the shared router fit (and on a fresh machine the static embedding's distillation)
def test_demo_config_with_shared_dataset(tmp_path: Path, shared_dataset: Path, shared_router_artifact: Path) -> None:
    """The repository's config.yaml over the real routing benchmark (the demo), answered by the replay,
    routing with the static-embedder artifact the demo fits."""
    import gzip
    import json

    from tests.procs import ROOT, server_env

    dataset = shared_dataset
    replay, replay_base = replay_server(dataset)
    port = free_port()
    text = (ROOT / "config.yaml").read_text().replace("http://127.0.0.1:8100/v1", replay_base)
    cfg = tmp_path / "config.yaml"
    health = free_port()
    assert "health_port: 8001" in text
    cfg.write_text(text.replace("port: 8000", f"port: {port}").replace("health_port: 8001", f"health_port: {health}"))
    env = server_env(UNIROUTE_DATASET=str(dataset), UNIROUTE_ROUTER_ARTIFACT=str(shared_router_artifact))
    with running_all(replay, gateway_server(cfg, env=env)):  # both start at once
        live = httpx.get(f"http://127.0.0.1:{health}/health/liveliness", timeout=10)  # the liveness listener
        assert live.status_code == 200 and live.json()["status"] == "ok", live.text
        with gzip.open(dataset / "prompts.jsonl.gz", "rt") as fh:
            prompt = json.loads(fh.readline())["prompt"]
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
            auto = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}])
            assert auto.model in {m.id for m in c.models.list()}
            assert auto.model_extra and auto.model_extra["uniroute"]["cluster"] is not None
            assert (auto.choices[0].message.content or "").startswith(("The answer is", "I cannot"))
            chunks = list(c.chat.completions.create(model=auto.model, stream=True,
                                                    messages=[{"role": "user", "content": prompt}]))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
                auto.choices[0].message.content
