"""Graders turn a model's answer into a score in [0, 1].

Profiling asks a model the router's validation prompts and grades each answer
against the prompt's reference ``answer`` (routing benchmark format). Graders are
pluggable: pick one by name with :func:`get_grader`, or pass any object with an
async ``grade(answer, reference, prompt)`` method.

- ``multiple_choice``: extracts the option letter the way MMLU-Pro's scripts do
  ("answer is (X)", then "Answer: X", then the last standalone letter A–J) and
  compares it with the reference letter.
- ``exact``: case- and whitespace-insensitive string equality.
- ``numeric``: the last number in the answer equals the reference within a
  relative tolerance.
- ``judge``: asks a judge model, through the same completion path as profiling,
  to rate the answer 0–10 against the reference; the score is rating / 10.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

LETTERS = "ABCDEFGHIJ"
_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"answer:\s*\(?([A-J])\)?", re.IGNORECASE)
# A lone option letter; "I" only when it is not the pronoun ("I think", "I'm").
_LONE_LETTER = re.compile(r"\b([A-HJ]|I(?![\s']+[a-z]))\b")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class Grader(Protocol):
    name: str

    async def grade(self, answer: str, reference: str | None, prompt: str) -> float:
        """Score ``answer`` in [0, 1]; raise ``GradingError`` when it cannot be graded at all."""
        ...


class GradingError(ValueError):
    """The answer cannot be graded (e.g. no reference answer for this prompt)."""


def _need_reference(reference: str | None, grader: str) -> str:
    if reference is None or not reference.strip():
        raise GradingError(f"grader {grader!r} needs a reference answer, and this prompt has none")
    return reference.strip()


def extract_choice(answer: str) -> str | None:
    """The option letter an answer commits to, or None (MMLU-Pro's extraction order)."""
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        m = pattern.search(answer)
        if m:
            return m.group(1).upper()
    found = _LONE_LETTER.findall(answer)
    return found[-1] if found else None


class MultipleChoiceGrader:
    name = "multiple_choice"

    async def grade(self, answer: str, reference: str | None, prompt: str) -> float:
        ref = _need_reference(reference, self.name).upper()
        return 1.0 if extract_choice(answer) == ref else 0.0


class ExactMatchGrader:
    name = "exact"

    @staticmethod
    def _norm(text: str) -> str:
        return " ".join(text.split()).casefold().rstrip(".")

    async def grade(self, answer: str, reference: str | None, prompt: str) -> float:
        ref = _need_reference(reference, self.name)
        return 1.0 if self._norm(answer) == self._norm(ref) else 0.0


def parse_number(text: str) -> float | None:
    """The last number written in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class NumericGrader:
    name = "numeric"

    def __init__(self, rel_tol: float = 1e-4, abs_tol: float = 1e-9) -> None:
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    async def grade(self, answer: str, reference: str | None, prompt: str) -> float:
        ref_text = _need_reference(reference, self.name)
        ref = parse_number(ref_text)
        if ref is None:
            raise GradingError(f"reference {ref_text!r} is not a number")
        got = parse_number(answer)
        if got is None:
            return 0.0
        return 1.0 if math.isclose(got, ref, rel_tol=self.rel_tol, abs_tol=self.abs_tol) else 0.0


#: ``complete(prompt) -> text``: how the judge grader reaches its judge model.
JudgeCall = Callable[[str], Awaitable[str]]

JUDGE_TEMPLATE = """You are grading an answer to a question.
Question:
{prompt}

Reference answer:
{reference}

Answer to grade:
{answer}

Rate how correct the answer is, from 0 (wrong) to 10 (fully correct). Reply with the number only."""


class JudgeGrader:
    """Asks a judge model for a 0–10 rating; the score is rating / 10."""

    name = "judge"

    def __init__(self, complete: JudgeCall, template: str = JUDGE_TEMPLATE) -> None:
        self.complete = complete
        self.template = template

    async def grade(self, answer: str, reference: str | None, prompt: str) -> float:
        reply = await self.complete(
            self.template.format(prompt=prompt, reference=reference or "(none given)", answer=answer)
        )
        rating = parse_number(reply)
        if rating is None:
            raise GradingError(f"judge reply has no rating: {reply[:80]!r}")
        return min(max(rating / 10.0, 0.0), 1.0)


GRADERS = ("multiple_choice", "exact", "numeric", "judge")


def get_grader(name: str, *, judge: JudgeCall | None = None) -> Grader:
    """Build a grader by name; ``judge`` is required for the ``judge`` grader."""
    if name == "multiple_choice":
        return MultipleChoiceGrader()
    if name == "exact":
        return ExactMatchGrader()
    if name == "numeric":
        return NumericGrader()
    if name == "judge":
        if judge is None:
            raise ValueError("grader 'judge' needs a judge model: set profiling.judge_model in config.yaml")
        return JudgeGrader(judge)
    raise ValueError(f"unknown grader {name!r}; known: {', '.join(GRADERS)}")
