"""Ask one model the router's validation prompts, grade the answers, keep every outcome.

The runner knows nothing of HTTP or SQL: it calls a :class:`Completer` (the gateway's
forwarding module provides one) and records into an :class:`OutcomeStore` (the SQL store
provides one; :class:`MemoryOutcomeStore` serves tests and dry runs). Outcomes are stored
as they arrive, so a run that stops can resume: prompts that already have an outcome are
skipped.

Concurrency is bounded. A failed call is retried with exponential backoff and jitter; an
upstream 429 waits at least its ``Retry-After``. A prompt that still fails is recorded as
a failure (no score) and reported; it never counts as a wrong answer.

A run gives up early when its first ``give_up_after`` answers (default 20, or every prompt
when there are fewer) all failed: a model that rejects every call (a wrong name, key or
address) is not asked the remaining prompts. ``RunReport.stopped`` then says why.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.secrets import scrub
from profiling.graders import Grader, GradingError

logger = logging.getLogger("uniroute.profiling")


@dataclass(frozen=True)
class ValidationPrompt:
    prompt_id: str
    text: str
    reference: str | None
    cluster: int


@dataclass(frozen=True)
class Completion:
    text: str
    cost_usd: float | None = None


class CompletionFailed(Exception):
    """A call to the model failed. ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Completer(Protocol):
    async def __call__(self, model: str, prompt: str) -> Completion:
        """Ask ``model`` one prompt (a single user message); raise CompletionFailed on failure."""
        ...


@dataclass(frozen=True)
class Outcome:
    model: str
    prompt_id: str
    cluster: int
    score: float | None  # None = failed, not graded
    answer: str = ""
    cost_usd: float | None = None
    error: str | None = None


class OutcomeStore(Protocol):
    def completed(self, model: str, prompt_ids: Sequence[str]) -> set[str]:
        """Prompt ids that already have a graded outcome for ``model``."""
        ...

    def record(self, outcome: Outcome) -> None:
        """Persist one outcome (insert or replace the earlier one for the same model and prompt)."""
        ...

    def outcomes(self, model: str) -> list[Outcome]:
        ...


class MemoryOutcomeStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], Outcome] = {}

    def completed(self, model: str, prompt_ids: Sequence[str]) -> set[str]:
        return {
            pid for pid in prompt_ids
            if (row := self._rows.get((model, pid))) is not None and row.score is not None
        }

    def record(self, outcome: Outcome) -> None:
        self._rows[(outcome.model, outcome.prompt_id)] = outcome

    def outcomes(self, model: str) -> list[Outcome]:
        return [o for (m, _), o in self._rows.items() if m == model]


@dataclass
class RunReport:
    model: str
    total: int
    skipped: int = 0  # already done in an earlier run
    graded: int = 0
    failed: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error message (truncated) -> count
    stopped: str | None = None  # why the run gave up before asking every prompt

    def summary(self) -> str:
        errs = "; ".join(f"{n}× {msg}" for msg, n in sorted(self.errors.items(), key=lambda kv: -kv[1])[:5])
        return (f"{self.model}: {self.graded} graded, {self.failed} failed, {self.skipped} already done "
                f"of {self.total} in {self.seconds:.1f}s, cost ${self.cost_usd:.4f}" + (f"; errors: {errs}" if errs else ""))

    def most_common_error(self) -> str | None:
        return max(self.errors.items(), key=lambda kv: kv[1])[0] if self.errors else None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay_s, self.base_delay_s * (2 ** attempt)) * (0.5 + random.random() / 2)
        return max(backoff, retry_after or 0.0)


ProgressCallback = Callable[[RunReport], None]


async def profile_model(
    model: str,
    prompts: Sequence[ValidationPrompt],
    *,
    complete: Completer,
    grader: Grader,
    store: OutcomeStore,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    progress: ProgressCallback | None = None,
    give_up_after: int = 20,
) -> RunReport:
    """Run every not-yet-graded prompt through ``model``; return what happened.

    Gives up (``report.stopped``) when the first ``min(give_up_after, prompts to ask)`` answers all
    failed and prompts remain; the answers in flight then finish without further retries. 0: never.
    """
    retry = retry or RetryPolicy()
    report = RunReport(model=model, total=len(prompts))
    done = store.completed(model, [p.prompt_id for p in prompts])
    todo = [p for p in prompts if p.prompt_id not in done]
    report.skipped = len(prompts) - len(todo)
    give_up = min(give_up_after, len(todo))
    started = time.perf_counter()
    queue: asyncio.Queue[ValidationPrompt] = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)

    async def one(p: ValidationPrompt) -> Outcome:
        last_error = "no attempt made"
        for attempt in range(retry.attempts):
            try:
                result = await complete(model, p.text)
            except CompletionFailed as exc:
                last_error = scrub(str(exc))[:200]
                if not exc.retryable or attempt == retry.attempts - 1 or report.stopped:
                    break
                await asyncio.sleep(retry.delay(attempt, exc.retry_after))
                continue
            try:
                score = await grader.grade(result.text, p.reference, p.text)
            except GradingError as exc:
                return Outcome(model, p.prompt_id, p.cluster, None, result.text, result.cost_usd, scrub(str(exc))[:200])
            return Outcome(model, p.prompt_id, p.cluster, score, result.text, result.cost_usd)
        return Outcome(model, p.prompt_id, p.cluster, None, error=last_error)

    async def worker() -> None:
        while not report.stopped:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcome = await one(p)
            await asyncio.to_thread(store.record, outcome)  # a SQL store must not block the event loop
            if outcome.cost_usd:
                report.cost_usd += outcome.cost_usd
            if outcome.score is None:
                report.failed += 1
                key = outcome.error or "unknown error"
                report.errors[key] = report.errors.get(key, 0) + 1
            else:
                report.graded += 1
            if give_up and not report.stopped and report.graded == 0 and report.failed >= give_up \
                    and not queue.empty():
                report.stopped = (f"gave up after the first {report.failed} answers all failed "
                                  f"(most often: {report.most_common_error()}); {queue.qsize()} prompts not asked")
            report.seconds = time.perf_counter() - started
            if progress is not None:
                progress(report)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(todo) or 1)))))
    report.seconds = time.perf_counter() - started
    return report
