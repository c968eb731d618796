"""gateway/serving/cooldown.py with an injected clock (no sleeping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.serving.cooldown import Cooldowns


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: float) -> tuple[Cooldowns, Clock, list[str], list[int]]:
    clock = Clock()
    entered: list[str] = []
    counts: list[int] = []
    cd = Cooldowns(int(kw.pop("failures", 3)), kw.pop("window_s", 60.0), kw.pop("cooldown_s", 30.0), clock=clock,
                   on_enter=entered.append, on_count=counts.append)
    return cd, clock, entered, counts


def ident(x: str) -> str:
    return x


def test_enters_after_n_failures_in_window_and_ends() -> None:
    cd, clock, entered, counts = make()
    assert not cd.failed("a") and not cd.failed("a")
    assert not cd.cooling("a")
    assert cd.failed("a")
    assert cd.cooling("a") and entered == ["a"] and counts[-1] == 1 and cd.active() == ["a"]
    assert list(cd.order(["a", "b", "c"], ident)) == ["b", "c", "a"]
    clock.now += 29.9
    assert cd.cooling("a")
    clock.now += 0.2
    assert not cd.cooling("a") and counts[-1] == 0 and cd.active() == []
    assert list(cd.order(["a", "b"], ident)) == ["a", "b"]


def test_failures_outside_the_window_do_not_count() -> None:
    cd, clock, entered, _ = make()
    cd.failed("a")
    cd.failed("a")
    clock.now += 61
    assert not cd.failed("a") and not cd.cooling("a") and entered == []
    assert not cd.failed("a")
    assert cd.failed("a") and cd.cooling("a")


def test_probation_one_failure_after_cooldown_reenters_one_success_clears() -> None:
    cd, clock, entered, _ = make(cooldown_s=10)
    for _ in range(3):
        cd.failed("a")
    clock.now += 11
    assert not cd.cooling("a")
    assert cd.failed("a") and cd.cooling("a") and entered == ["a", "a"]  # straight back
    clock.now += 11
    assert not cd.cooling("a")
    cd.succeeded("a")  # a success after the cooldown clears it
    assert not cd.failed("a") and not cd.failed("a") and not cd.cooling("a")  # counting starts over


def test_success_during_cooldown_clears_it() -> None:
    cd, _, _, counts = make()
    for _ in range(3):
        cd.failed("a")
    cd.succeeded("a")  # e.g. a named call that worked
    assert not cd.cooling("a") and counts[-1] == 0


def test_success_does_not_forgive_failures_before_a_cooldown() -> None:
    cd, _, _, _ = make()
    cd.failed("a")
    cd.failed("a")
    cd.succeeded("a")  # a flaky model: 3 failures in the window still cool it
    assert cd.failed("a") and cd.cooling("a")


def test_retry_after_stretches_the_cooldown() -> None:
    cd, clock, _, _ = make(cooldown_s=5)
    cd.failed("a")
    cd.failed("a")
    cd.failed("a", retry_after_s=120)
    clock.now += 100
    assert cd.cooling("a")
    clock.now += 21
    assert not cd.cooling("a")


def test_all_cooling_keeps_the_ranking() -> None:
    cd, _, _, _ = make(failures=1)
    cd.failed("a")
    cd.failed("b")
    assert list(cd.order(["b", "a"], ident)) == ["b", "a"]  # never fail closed: try the best anyway
    assert list(cd.order(["b", "c", "a"], ident)) == ["c", "b", "a"]  # healthy first, ranking kept


def test_failures_while_cooling_do_not_extend_it() -> None:
    cd, clock, entered, _ = make(failures=1, cooldown_s=10)
    cd.failed("a")
    clock.now += 5
    assert not cd.failed("a")  # a named call failing while it cools
    clock.now += 5.1
    assert not cd.cooling("a") and entered == ["a"]


def test_zero_failures_means_off() -> None:
    cd, _, _, _ = make(failures=0)
    assert not cd.enabled
    for _ in range(10):
        assert not cd.failed("a")
    assert not cd.cooling("a")


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="window_s"):
        Cooldowns(3, 0, 30)


# -- end to end: `uniroute serve` (real uvicorn) → LiteLLM → `uniroute replay --fail bad-500=500` -------------


def test_e2e_failing_model_cools_and_auto_goes_straight_to_the_next(tmp_path: Path) -> None:
    import time

    import httpx
    import openai

    from tests.gateway_setup import make_dataset, replay_args, write_config
    from tests.procs import free_port, replay_upstream, running
    from tests.test_metrics import _value

    # the checks made during the cooldown (five requests and a scrape) must all fit in it: on two loaded
    # cores (load average 10+, tests in parallel) they have taken over 2 s; an explicit guard below says so
    cooldown_s = 8.0
    dataset = make_dataset(tmp_path)
    with replay_upstream(dataset, *replay_args()) as replay_base:
        port = free_port()
        cfg = write_config(tmp_path, dataset, replay_base, port=port, log_level="warning",
                           fallback={"max_attempts": 3, "cooldown_failures": 2, "cooldown_window_s": 60,
                                     "cooldown_s": cooldown_s})
        base = f"http://127.0.0.1:{port}"
        with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg)], f"{base}/health/readiness"), \
                openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:

            def ask(stream: bool = False) -> tuple[int, list[str]]:
                msgs: Any = [{"role": "user", "content": "hello"}]
                if stream:
                    with client.chat.completions.with_streaming_response.create(
                            model="auto", messages=msgs, stream=True) as streamed:
                        header = int(streamed.headers["x-uniroute-attempts"])
                        ext = [c.model_extra.get("uniroute") for c in streamed.parse() if c.model_extra][-1]
                else:
                    raw = client.chat.completions.with_raw_response.create(model="auto", messages=msgs)
                    header, ext = int(raw.headers["x-uniroute-attempts"]), (raw.parse().model_extra or {})["uniroute"]
                assert ext is not None
                names = [a["model"] for a in ext["attempts"]]
                assert header == len(names)
                return header, names

            # the cheapest policy ranks bad-500 first: two failures put it into cooldown
            assert ask() == (2, ["bad-500", "small-general"])
            assert ask(stream=True) == (2, ["bad-500", "small-general"])
            cooled_at = time.monotonic()
            assert ask() == (1, ["small-general"])  # straight to the next model
            assert ask(stream=True) == (1, ["small-general"])
            metrics = httpx.get(f"{base}/metrics").text
            assert _value(metrics, "uniroute_cooldowns_total", model="bad-500") == 1
            assert _value(metrics, "uniroute_models_in_cooldown") == 1
            assert _value(metrics, "uniroute_upstream_attempts_total", model="bad-500", outcome="upstream_error") == 2
            assert _value(metrics, "uniroute_upstream_attempts_total", model="small-general", outcome="success") == 4
            # a named model is still called while it cools (the client asked for it); the error carries the header
            r = httpx.post(f"{base}/v1/chat/completions",
                           json={"model": "bad-500", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 502 and r.headers["x-uniroute-attempts"] == "1"
            r = httpx.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": []})
            assert r.status_code in (400, 404) and r.headers["x-uniroute-attempts"] == "0"
            assert time.monotonic() < cooled_at + cooldown_s, "the checks above outlasted the cooldown: raise cooldown_s"
            # the cooldown ends: bad-500 is tried again; it still fails, so it is back in cooldown at once
            time.sleep(max(0.0, cooled_at + cooldown_s + 0.2 - time.monotonic()))
            # under a loaded machine the scrape itself may lag: poll (bounded) rather than read once
            deadline = time.monotonic() + 10.0
            while _value(httpx.get(f"{base}/metrics").text, "uniroute_models_in_cooldown") != 0:
                assert time.monotonic() < deadline, "bad-500 is still in cooldown 10 s after cooldown_s ended"
                time.sleep(0.2)
            assert ask() == (2, ["bad-500", "small-general"])
            assert ask() == (1, ["small-general"])
            assert _value(httpx.get(f"{base}/metrics").text, "uniroute_cooldowns_total", model="bad-500") == 2
