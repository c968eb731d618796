from __future__ import annotations

import pytest

from profiling.graders import GradingError, extract_choice, get_grader, parse_number


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("The answer is (C).", "C"),
        ("Let's think. ... the answer is D", "D"),
        ("Answer: B", "B"),
        ("answer: (J)", "J"),
        ("I pick A over B, so B", "B"),
        ("I cannot determine the answer.", None),
        ("", None),
    ],
)
def test_extract_choice(answer: str, letter: str | None) -> None:
    assert extract_choice(answer) == letter


async def test_multiple_choice() -> None:
    g = get_grader("multiple_choice")
    assert await g.grade("The answer is (C).", "C", "q") == 1.0
    assert await g.grade("The answer is (C).", "c", "q") == 1.0
    assert await g.grade("The answer is (A).", "C", "q") == 0.0
    assert await g.grade("no idea", "C", "q") == 0.0
    with pytest.raises(GradingError, match="needs a reference"):
        await g.grade("A", None, "q")


async def test_exact_and_numeric() -> None:
    exact = get_grader("exact")
    assert await exact.grade("  Paris. ", "paris", "q") == 1.0
    assert await exact.grade("Lyon", "Paris", "q") == 0.0
    num = get_grader("numeric")
    assert await num.grade("so the total is 1,234.0", "1234", "q") == 1.0
    assert await num.grade("about 12", "13", "q") == 0.0
    assert await num.grade("no number", "13", "q") == 0.0
    assert parse_number("x = -3.5e2 then 7") == 7.0


async def test_judge() -> None:
    prompts: list[str] = []

    async def judge(prompt: str) -> str:
        prompts.append(prompt)
        return "8"

    g = get_grader("judge", judge=judge)
    assert await g.grade("an answer", "the reference", "the question") == pytest.approx(0.8)
    assert "the reference" in prompts[0] and "the question" in prompts[0]

    async def bad(prompt: str) -> str:
        return "excellent"

    with pytest.raises(GradingError, match="no rating"):
        await get_grader("judge", judge=bad).grade("a", "b", "c")


def test_unknown_grader() -> None:
    with pytest.raises(ValueError, match="unknown grader 'x'; known: multiple_choice, exact, numeric, judge"):
        get_grader("x")
    with pytest.raises(ValueError, match="judge_model"):
        get_grader("judge")


@pytest.mark.parametrize(("answer", "letter"), [("(I)", "I"), ("It is option I.", "I"), ("I'm unsure; A", "A")])
def test_extract_choice_letter_i(answer: str, letter: str) -> None:
    assert extract_choice(answer) == letter
