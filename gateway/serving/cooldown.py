"""Cooldown of failing models: a model that keeps failing is skipped by ``auto`` for a while.

A model enters cooldown after ``failures`` retryable failures (timeout, 429, 5xx, connection
error — never a failure caused by the request itself: a provider 4xx such as 400, 413 or 422, or a
payload that cannot be encoded; ``forwarding.caused_by_request``) within ``window_s`` seconds, and stays
in it for ``cooldown_s`` (a 429 with ``Retry-After`` stretches that to at least the
provider's ask). While it cools, :meth:`Cooldowns.order` moves it behind every healthy
candidate, so ``auto`` goes around it; when every candidate is cooling the ranking is kept
as it is, so the best model is still tried rather than failing closed. When the cooldown
ends the model is on probation: one success clears it, one more failure puts it straight
back into cooldown. A success during the cooldown (a named call, or the best of an all-cooling
ranking) clears it too.

Explicitly named models are still called (the client asked for that model), but their
failures count like any other.

The state is per process: each replica and each worker learns on its own (docs/DEPLOY.md).
The clock is injectable, so tests need no sleeping. Every method is O(1) per model, and
:meth:`order` returns its input unchanged when nothing is cooling (the common case).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)  # times of recent retryable failures
    until: float = 0.0  # cooling while clock() < until
    probation: bool = False  # cooldown ended; the next outcome decides


class Cooldowns:
    """Per-model failure counting and cooldown (see the module docstring)."""

    def __init__(
        self,
        failures: int = 3,
        window_s: float = 60.0,
        cooldown_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_enter: Callable[[str], None] | None = None,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        if failures < 0 or window_s <= 0 or cooldown_s < 0:
            raise ValueError("need failures >= 0 (0 = off), window_s > 0, cooldown_s >= 0")
        self.failures = failures
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_enter = on_enter
        self.on_count = on_count
        self._states: dict[str, _State] = {}  # models with recent failures or a cooldown
        self._cooling: dict[str, float] = {}  # model -> until, only while (possibly) cooling

    @property
    def enabled(self) -> bool:
        return self.failures > 0 and self.cooldown_s > 0

    # -- queries ----------------------------------------------------------------------

    def cooling(self, name: str) -> bool:
        until = self._cooling.get(name)
        if until is None:
            return False
        if self.clock() < until:
            return True
        self._expire(name)
        return False

    def active(self) -> list[str]:
        """The models in cooldown now."""
        return [n for n in list(self._cooling) if self.cooling(n)]

    def order(self, candidates: Sequence[T], name: Callable[[T], str]) -> Sequence[T]:
        """``candidates`` with the cooling ones moved behind the others (ranking kept within each
        group); unchanged when none or all of them cool."""
        if not self._cooling:
            return candidates
        healthy: list[T] = []
        cooling: list[T] = []
        for c in candidates:
            (cooling if self.cooling(name(c)) else healthy).append(c)
        if not healthy or not cooling:
            return candidates
        return healthy + cooling

    # -- outcomes ---------------------------------------------------------------------

    def succeeded(self, name: str) -> None:
        """A successful call clears the model's cooldown (or probation); failures inside the window that
        have not yet led to a cooldown are kept. A cheap no-op for a model without failures."""
        state = self._states.get(name)
        if state is None:
            return
        if state.until or not state.failures:
            del self._states[name]
            if self._cooling.pop(name, None) is not None:
                self._count()

    def failed(self, name: str, retry_after_s: float | None = None) -> bool:
        """A retryable failure of ``name``. Returns True if this put the model into cooldown."""
        if not self.enabled:
            return False
        now = self.clock()
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _State()
        if now < state.until:  # already cooling (e.g. a named call): just counts
            return False
        if name in self._cooling:  # the cooldown ended before anyone asked
            self._expire(name)
        fails = state.failures
        fails.append(now)
        while fails and fails[0] <= now - self.window_s:
            fails.popleft()
        if not state.probation and len(fails) < self.failures:
            return False
        duration = max(self.cooldown_s, retry_after_s or 0.0)
        state.until = now + duration
        state.probation = False
        fails.clear()
        self._cooling[name] = state.until
        if self.on_enter is not None:
            self.on_enter(name)
        self._count()
        return True

    def _expire(self, name: str) -> None:
        self._cooling.pop(name, None)
        state = self._states.get(name)
        if state is not None:
            state.probation = True
        self._count()

    def _count(self) -> None:
        if self.on_count is not None:
            now = self.clock()
            self.on_count(sum(1 for until in self._cooling.values() if now < until))
