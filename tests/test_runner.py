from __future__ import annotations

import asyncio

from profiling.graders import get_grader
from profiling.runner import (
    Completion,
    CompletionFailed,
    MemoryOutcomeStore,
    RetryPolicy,
    RunReport,
    ValidationPrompt,
    profile_model,
)

PROMPTS = [ValidationPrompt(f"p{i}", f"question {i}", "ABCD"[i % 4], i % 2) for i in range(20)]
FAST = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.01)


class Model:
    """A stand-in model: answers letter A for every prompt, can fail a given number of times per prompt."""

    def __init__(self, fail_first: int = 0, retry_after: float | None = None, fatal: set[str] | None = None) -> None:
        self.calls: dict[str, int] = {}
        self.fail_first = fail_first
        self.retry_after = retry_after
        self.fatal = fatal or set()
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, model: str, prompt: str) -> Completion:
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if prompt in self.fatal:
                raise CompletionFailed("upstream said 400", retryable=False)
            if self.calls[prompt] <= self.fail_first:
                raise CompletionFailed("upstream 429", retry_after=self.retry_after)
            return Completion("The answer is (A).", cost_usd=0.001)
        finally:
            self.in_flight -= 1


async def test_grades_all_and_bounds_concurrency() -> None:
    store = MemoryOutcomeStore()
    model = Model()
    seen: list[int] = []

    def progress(r: RunReport) -> None:
        seen.append(r.graded + r.failed)

    report = await profile_model("m", PROMPTS, complete=model, grader=get_grader("multiple_choice"),
                                 store=store, concurrency=3, retry=FAST, progress=progress)
    assert report.graded == 20 and report.failed == 0
    assert model.max_in_flight <= 3
    assert abs(report.cost_usd - 0.02) < 1e-9
    scores = {o.prompt_id: o.score for o in store.outcomes("m")}
    assert scores["p0"] == 1.0 and scores["p1"] == 0.0  # reference letters A, B, C, D in turn
    assert seen[-1] == 20


async def test_resumes_and_retries() -> None:
    store = MemoryOutcomeStore()
    flaky = Model(fail_first=1, retry_after=0.0)
    first = await profile_model("m", PROMPTS[:10], complete=flaky, grader=get_grader("multiple_choice"),
                                store=store, retry=FAST)
    assert first.graded == 10
    assert all(n == 2 for n in flaky.calls.values())  # one 429, one success each
    again = Model()
    second = await profile_model("m", PROMPTS, complete=again, grader=get_grader("multiple_choice"),
                                 store=store, retry=FAST)
    assert second.skipped == 10 and second.graded == 10
    assert set(again.calls) == {p.text for p in PROMPTS[10:]}


async def test_failures_are_recorded_not_scored() -> None:
    store = MemoryOutcomeStore()
    model = Model(fatal={"question 3"}, fail_first=0)
    always_429 = Model(fail_first=99)
    report = await profile_model("m", PROMPTS[:5], complete=model, grader=get_grader("multiple_choice"),
                                 store=store, retry=FAST)
    assert report.failed == 1 and report.graded == 4
    assert report.errors == {"upstream said 400": 1}
    assert model.calls["question 3"] == 1  # not retried
    failed = [o for o in store.outcomes("m") if o.score is None]
    assert [o.prompt_id for o in failed] == ["p3"]
    report2 = await profile_model("m2", PROMPTS[:2], complete=always_429, grader=get_grader("multiple_choice"),
                                  store=store, retry=FAST)
    assert report2.failed == 2 and always_429.calls["question 0"] == FAST.attempts
    assert "2× upstream 429" in report2.summary()


def test_retry_after_is_respected() -> None:
    assert RetryPolicy(base_delay_s=0.01).delay(0, retry_after=2.5) >= 2.5


async def test_gives_up_when_the_first_answers_all_fail() -> None:
    prompts = [ValidationPrompt(f"p{i}", f"question {i}", "A", i % 2) for i in range(200)]
    store = MemoryOutcomeStore()
    dead = Model(fatal={p.text for p in prompts})
    report = await profile_model("m", prompts, complete=dead, grader=get_grader("multiple_choice"), store=store,
                                 concurrency=4, retry=FAST)
    assert report.graded == 0 and 20 <= report.failed < 20 + 4  # the 20th failure stops it; in-flight ones finish
    assert sum(dead.calls.values()) == report.failed  # nothing else was asked
    assert report.stopped and "first 20 answers all failed" in report.stopped
    assert "upstream said 400" in report.stopped and f"{200 - report.failed} prompts not asked" in report.stopped
    # one good answer among the first 20: no giving up
    flaky = Model(fatal={p.text for p in prompts[1:30]})
    report = await profile_model("m2", prompts[:40], complete=flaky, grader=get_grader("multiple_choice"),
                                 store=store, concurrency=1, retry=FAST)
    assert report.stopped is None and report.graded + report.failed == 40
    # fewer prompts than the threshold, all failing: every one is asked, nothing left to give up on
    report = await profile_model("m3", prompts[:5], complete=Model(fatal={p.text for p in prompts}),
                                 grader=get_grader("multiple_choice"), store=store, retry=FAST)
    assert report.failed == 5 and report.stopped is None
