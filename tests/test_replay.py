"""The replay upstream, as a real uvicorn server on loopback, called with the official openai SDK."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from starlette.testclient import TestClient

from replay.app import (
    NO_ANSWER_TEXT,
    NO_RECORDING_MARK,
    create_replay_app,
    estimate_tokens,
    render_answer,
    split_pieces,
)
from routing.dataset import BenchmarkDataset, load_dataset
from routing.synthetic import make_synthetic_dataset
from tests.procs import replay_server, running_all

ROOT = Path(__file__).resolve().parent.parent
SLOW_MODEL = "large-general"
SLOW_MS = 300.0
FAILING_MODEL = "bio-expert"


@dataclasses.dataclass
class ReplayServer:
    base_url: str
    dataset: BenchmarkDataset
    proc: subprocess.Popen[bytes]


def _start(dataset_dir: Path, *extra: str) -> Iterator[ReplayServer]:
    spec, base = replay_server(dataset_dir, *extra)
    with running_all(spec) as (proc,):
        yield ReplayServer(base, load_dataset(dataset_dir), proc)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("replay") / "syn", n_prompts=40, seed=3)


@pytest.fixture(scope="module")
def server(dataset_dir: Path) -> Iterator[ReplayServer]:
    yield from _start(dataset_dir, "--latency-ms", f"{SLOW_MODEL}={SLOW_MS:g}", "--fail", f"{FAILING_MODEL}=500")


@pytest.fixture
def client(server: ReplayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=10)


def _user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


# --- over the wire ---------------------------------------------------------------------------

def test_lists_dataset_models(client: openai.OpenAI, server: ReplayServer) -> None:
    assert [m.id for m in client.models.list()] == server.dataset.models
    assert client.models.retrieve("math-expert").id == "math-expert"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["small-general", "math-expert", SLOW_MODEL])
def test_recorded_prompt_gets_recorded_answer(client: openai.OpenAI, server: ReplayServer, model: str) -> None:
    ds = server.dataset
    j = ds.models.index(model)
    for i in (0, 7, 39):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=_user(ds.prompts[i]))
        resp = raw.parse()
        assert raw.headers["x-replay-recorded"] == "true"
        assert resp.model == model
        assert resp.choices[0].message.content == f"The answer is ({ds.responses[i][j]})."
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage is not None
        assert resp.usage.prompt_tokens == estimate_tokens(len(ds.prompts[i]))
        assert resp.usage.completion_tokens >= 1
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_prompt_matches_modulo_whitespace_and_text_parts(client: openai.OpenAI, server: ReplayServer) -> None:
    ds = server.dataset
    expected = f"The answer is ({ds.responses[5][0]})."
    padded = client.chat.completions.create(model=ds.models[0], messages=_user(f"\n  {ds.prompts[5]}  \n"))
    assert padded.choices[0].message.content == expected
    parts = client.chat.completions.create(
        model=ds.models[0],
        messages=[
            {"role": "system", "content": "Answer with a letter."},
            {"role": "user", "content": [{"type": "text", "text": ds.prompts[5]}]},
        ],
    )
    assert parts.choices[0].message.content == expected
    # The system message counts towards the prompt tokens.
    assert parts.usage is not None
    assert parts.usage.prompt_tokens == estimate_tokens(len(ds.prompts[5]) + len("Answer with a letter."))


def test_unknown_prompt_is_marked(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="small-general", messages=_user("What is 2+2?"))
    resp = raw.parse()
    assert raw.headers["x-replay-recorded"] == "false"
    content = resp.choices[0].message.content or ""
    assert content.startswith(NO_RECORDING_MARK)
    assert resp.usage is not None and resp.usage.completion_tokens == estimate_tokens(len(content))


def test_streaming_with_usage(client: openai.OpenAI, server: ReplayServer) -> None:
    ds = server.dataset
    stream = client.chat.completions.create(
        model="math-expert", messages=_user(ds.prompts[2]), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"The answer is ({ds.responses[2][ds.models.index('math-expert')]})."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4  # one per word
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == estimate_tokens(len(ds.prompts[2]))
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.model == "math-expert" for c in chunks)


def test_streaming_without_usage_ends_with_done(server: ReplayServer) -> None:
    body = {"model": "small-general", "messages": _user("hello"), "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in e for e in events[:-1])


async def test_async_client_streaming(server: ReplayServer) -> None:
    ds = server.dataset
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as aclient:
        resp = await aclient.chat.completions.create(model="small-general", messages=_user(ds.prompts[1]))
        assert resp.choices[0].message.content == f"The answer is ({ds.responses[1][0]})."
        stream = await aclient.chat.completions.create(
            model="small-general", messages=_user(ds.prompts[1]), stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == resp.choices[0].message.content


def test_max_tokens_truncates(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="small-general", messages=_user("unrecorded"), max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == NO_RECORDING_MARK[:8]
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_n_choices(client: openai.OpenAI, server: ReplayServer) -> None:
    resp = client.chat.completions.create(model="small-general", messages=_user(server.dataset.prompts[0]), n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 1


def test_unknown_model_is_openai_404(client: openai.OpenAI, server: ReplayServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=_user("hi"))
    err = info.value.body
    assert isinstance(err, dict)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-nope" in err["message"] and all(m in err["message"] for m in server.dataset.models)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "small-general"}', "messages"),
        (b'{"model": "small-general", "messages": []}', "messages"),
        (b'{"model": "small-general", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
         "max_tokens"),
        (b'{"model": "small-general", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    ],
)
def test_bad_requests_are_openai_400(server: ReplayServer, body: bytes, param: str | None) -> None:
    r = httpx.post(f"{server.base_url}/chat/completions", content=body, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_wrong_method_is_405(server: ReplayServer) -> None:
    r = httpx.get(f"{server.base_url}/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_latency_option_delays_only_that_model(client: openai.OpenAI, server: ReplayServer) -> None:
    prompt = server.dataset.prompts[0]
    t0 = time.perf_counter()
    client.chat.completions.create(model=SLOW_MODEL, messages=_user(prompt))
    slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    client.chat.completions.create(model="small-general", messages=_user(prompt))
    fast = time.perf_counter() - t0
    assert slow >= SLOW_MS / 1000
    assert fast < SLOW_MS / 1000


def test_fail_option_gives_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=FAILING_MODEL, messages=_user("hi"))
    assert info.value.status_code == 500
    assert "injected" in str(info.value.body)


def test_faults_can_be_changed_at_run_time(client: openai.OpenAI, server: ReplayServer) -> None:
    config = f"{server.base_url.removesuffix('/v1')}/_replay/config"
    try:
        r = httpx.post(config, json={"faults": {"small-general": "429", "math-expert": "timeout"}}, timeout=10)
        assert r.status_code == 200, r.text
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="small-general", messages=_user("hi"))
        t0 = time.perf_counter()
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.5).chat.completions.create(model="math-expert", messages=_user("hi"))
        assert time.perf_counter() - t0 < 5
        bad = httpx.post(config, json={"faults": {"small-general": "503"}}, timeout=10)
        assert bad.status_code == 400 and "500, 429, timeout" in bad.json()["error"]["message"]
    finally:
        httpx.post(config, json={"faults": {FAILING_MODEL: "500"}}, timeout=10)
    ok = client.chat.completions.create(model="small-general", messages=_user("hi"))
    assert ok.choices[0].message.content


def test_cli_rejects_unknown_model_in_options(dataset_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset_dir), "--port", "0",
           "--fail", "nope=500"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown model 'nope'" in out.stderr and "small-general" in out.stderr


# --- in process: what the synthetic data cannot show ------------------------------------------

def test_completion_tokens_follow_recorded_cost_and_empty_answer(dataset_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    costs = np.full_like(ds.query_costs, np.nan)
    # cost = params_B × (prompt_tokens + generated_tokens) / 1000, with 100 generated tokens
    costs[0, :] = ds.model_costs * (len(ds.prompts[0]) / 4 + 100) / 1000
    responses = [list(r) for r in ds.responses]
    responses[1][0] = ""
    ds = dataclasses.replace(ds, query_costs=costs, responses=responses)
    with TestClient(create_replay_app(ds, stream_chunks=2)) as tc:
        r = tc.post("/v1/chat/completions", json={"model": ds.models[1], "messages": _user(ds.prompts[0])})
        assert r.json()["usage"]["completion_tokens"] == 100
        r = tc.post("/v1/chat/completions", json={"model": ds.models[0], "messages": _user(ds.prompts[1])})
        assert r.json()["choices"][0]["message"]["content"] == NO_ANSWER_TEXT
        body = {"model": ds.models[0], "messages": _user(ds.prompts[0]), "stream": True}
        events = [line for line in tc.post("/v1/chat/completions", json=body).text.splitlines() if line]
        # role, 2 content pieces, finish, [DONE]
        assert len(events) == 5


def test_render_and_split() -> None:
    assert render_answer("C") == "The answer is (C)."
    assert render_answer(" ") == NO_ANSWER_TEXT
    assert render_answer("forty-two") == "forty-two"
    assert split_pieces("The answer is (C).", None) == ["The", " answer", " is", " (C)."]
    assert split_pieces("  a b  ", None) == ["  a", " b  "]
    assert "".join(split_pieces("abcdefg", 3)) == "abcdefg" and len(split_pieces("abcdefg", 3)) == 3
    assert split_pieces("ab", 5) == ["a", "b"]
    assert split_pieces("", None) == []


def test_constructor_rejects_bad_knobs(dataset_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'x'"):
        create_replay_app(dataset_dir, latency_ms={"x": 1.0})
    with pytest.raises(ValueError, match="must be one of"):
        create_replay_app(dataset_dir, faults={"*": "boom"})
    with pytest.raises(ValueError, match="stream_chunks"):
        create_replay_app(dataset_dir, stream_chunks=0)


@pytest.mark.data
def test_real_dataset_answers(shared_dataset: Path) -> None:
    ds = load_dataset(shared_dataset)
    with TestClient(create_replay_app(ds)) as tc:
        for i in (0, ds.n_prompts // 2, ds.n_prompts - 1):
            for j in (0, ds.n_models - 1):
                r = tc.post("/v1/chat/completions", json={"model": ds.models[j], "messages": _user(ds.prompts[i])})
                assert r.status_code == 200
                assert r.json()["choices"][0]["message"]["content"] == render_answer(ds.responses[i][j])
