"""Budget pacing: the λ of a key with ``budget_policy: pace``, so that its spend tracks budget × elapsed share.

Pure arithmetic: no HTTP, no SQL, no clock (times are seconds on any one clock, passed in). The store-backed
pacer (:mod:`gateway.access.pacing`) reads a key's budget and this controller's state from the database, calls
:func:`pace_step` and writes the new state back, so every replica serves the same λ; the simulation
(``uniroute simulate``) and the unit tests drive it directly.

The controller (docs/PACING.md):

* **Feed-forward from the calibration curve.** ``C(λ)`` is the expected mean normalised cost per request at λ
  on the router's validation prompts (:class:`CostCurve`, the curve ``uniroute router calibrate`` bisects).
  Spend per second is ``D · C(λ)``, where the *demand* ``D`` (USD per unit of normalised cost per second) lumps
  the request rate and the USD price of a normalised cost unit. ``D`` is estimated from the period so far:
  settled spend over the *exposure* ``∫ C(λ(t)) dt`` since the period started. The λ that spends what is left
  over the time that is left is then ``C⁻¹((B' - S) / (D · T_left))``.
* **Feedback on measured spend (PI).** The error ``e = (S - B' · elapsed share) / B'`` (how far spend runs ahead
  of the line, as a share of the budget) and its integral over the period scale the feed-forward's target cost
  by ``exp(-(kp · e + ki · ∫e))``: λ rises while spend runs ahead, falls again when there is room.

``B'`` is the budget less a small headroom (:attr:`PaceParams.headroom`): the hard cap (the reservations of
:mod:`gateway.access.budget`) still holds, and aiming just under it keeps the paced key's requests from meeting
it. ``S`` counts settled spend plus the estimates held by requests in flight.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: The λ grid the gateway evaluates the calibration curve on: 0 and log-spaced points up to 100.
DEFAULT_LAMBDA_GRID: tuple[float, ...] = (0.0, *(10 ** (-3 + 5 * i / 79) for i in range(80)))


@dataclass(frozen=True)
class CostCurve:
    """Expected mean normalised cost per request at each λ of an increasing grid (non-increasing in λ).

    Between grid points the curve is linear (the true curve is a step function; the interpolation keeps
    λ continuous in the target cost). Beyond the grid it is flat."""

    lams: tuple[float, ...]
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lams) < 2 or len(self.lams) != len(self.costs):
            raise ValueError(f"a cost curve needs >= 2 points with one cost per λ, got {len(self.lams)} λ and "
                             f"{len(self.costs)} costs")
        if any(b <= a for a, b in zip(self.lams, self.lams[1:], strict=False)) or self.lams[0] < 0:
            raise ValueError("the λ grid of a cost curve must be increasing and start at >= 0")
        if any(not math.isfinite(c) or c < 0 for c in self.costs):
            raise ValueError("the costs of a cost curve must be finite and >= 0")

    @classmethod
    def from_points(cls, lams: Sequence[float], costs: Sequence[float]) -> CostCurve:
        """A curve from measured points, made non-increasing (a running minimum absorbs ties broken otherwise)."""
        out: list[float] = []
        for c in costs:
            out.append(min(float(c), out[-1]) if out else float(c))
        return cls(tuple(float(x) for x in lams), tuple(out))

    def cost_at(self, lam: float) -> float:
        lams, costs = self.lams, self.costs
        if lam <= lams[0]:
            return costs[0]
        if lam >= lams[-1]:
            return costs[-1]
        j = bisect.bisect_right(lams, lam)
        a, b = lams[j - 1], lams[j]
        w = (lam - a) / (b - a)
        return costs[j - 1] + w * (costs[j] - costs[j - 1])

    def lambda_for(self, cost: float) -> float:
        """The least λ whose expected cost is <= ``cost`` (the grid's ends outside the curve's range)."""
        lams, costs = self.lams, self.costs
        if cost >= costs[0]:
            return lams[0]
        if cost <= costs[-1]:
            return lams[-1]
        j = next(i for i, c in enumerate(costs) if c <= cost)  # costs[j - 1] > cost >= costs[j]
        a, b = costs[j - 1], costs[j]
        w = (a - cost) / (a - b)
        return lams[j - 1] + w * (lams[j] - lams[j - 1])


#: Used when the router has no calibration curve (the ``cheapest`` placeholder policy, where λ changes nothing):
#: a smooth stand-in, so the feedback still moves λ within the key's range.
FALLBACK_CURVE = CostCurve.from_points(DEFAULT_LAMBDA_GRID, [1.0 / (1.0 + 10.0 * lam) for lam in DEFAULT_LAMBDA_GRID])


@dataclass(frozen=True)
class PaceParams:
    """The controller's gains and margins (dimensionless; times are shares of the budget period)."""

    kp: float = 0.5  # proportional gain on the tracking error (share of the budget ahead of the line)
    ki: float = 1.0  # integral gain on the error integrated over the period's elapsed share
    headroom: float = 0.01  # aim at budget × (1 - headroom): a margin below the hard cap for the last requests
    warmup_share: float = 0.01  # before this share of the period has elapsed (or anything was spent) λ is held
    min_left_share: float = 0.02  # the time left is counted as at least this share of the period (no end spree)
    integral_limit: float = 2.0  # |∫e| is clamped (anti-windup while λ sits at a bound)
    # the spend line reaches the target this share of the period before its end: the hard cap counts each
    # request's worst-case reservation, so near the end only the models whose reservation fits what is left
    # can serve (a paced key degrades to them, ChatService._reserve) and no late catch-up on dear models can
    # happen; the spend has to be in by then
    finish_share: float = 0.07


@dataclass(frozen=True)
class PaceState:
    """What the controller keeps between steps (one per key, shared through the store)."""

    lam: float  # the λ in use
    integral: float  # ∫ e d(share) since the period started
    exposure: float  # ∫ C(λ(t)) dt since the period started, seconds × normalised cost
    updated_at: float  # seconds, when this state was computed
    period_start: float  # seconds, the start of the budget period this state belongs to


@dataclass(frozen=True)
class PaceInputs:
    """A key's budget as it stands now (seconds on the same clock as :class:`PaceState`)."""

    now: float
    period_start: float
    period_end: float
    budget_usd: float
    spent_usd: float  # settled this period
    reserved_usd: float  # held by requests in flight
    lambda_min: float
    lambda_max: float
    default_lambda: float  # the key's λ: where a new pace starts


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def pace_step(state: PaceState | None, inp: PaceInputs, curve: CostCurve | None = None,
              params: PaceParams = PaceParams()) -> PaceState:
    """The next state (and so the λ to serve) from the last one and the key's budget now.

    A missing state, or one of an earlier period, starts a new pace: from the last λ (or the key's default),
    with no integral, and an exposure as if that λ had been in use since the period started (so the first
    demand estimate is the period's spend so far over it).
    """
    curve = curve or FALLBACK_CURVE
    lo, hi = inp.lambda_min, inp.lambda_max
    span = max(inp.period_end - inp.period_start, 1e-9)
    now = _clamp(inp.now, inp.period_start, inp.period_end)
    if state is None or state.period_start != inp.period_start:
        lam0 = _clamp(state.lam if state is not None else inp.default_lambda, lo, hi)
        state = PaceState(lam=lam0, integral=0.0, exposure=curve.cost_at(lam0) * (now - inp.period_start),
                          updated_at=now, period_start=inp.period_start)
    dt = max(0.0, now - state.updated_at)
    exposure = state.exposure + curve.cost_at(state.lam) * dt
    target = inp.budget_usd * (1.0 - params.headroom)
    spent = max(0.0, inp.spent_usd) + max(0.0, inp.reserved_usd)
    left = target - spent
    if target <= 0 or left <= 0:  # nothing left to pace: the cheapest end of the key's range
        return PaceState(hi, state.integral, exposure, now, state.period_start)
    line_span = span * (1.0 - params.finish_share)
    share = min(1.0, (now - inp.period_start) / line_span)
    error = (spent - target * share) / target
    integral = _clamp(state.integral + error * dt / span, -params.integral_limit, params.integral_limit)
    if share < params.warmup_share or inp.spent_usd <= 0 or exposure <= 0:
        aim = curve.cost_at(state.lam)  # no demand estimate yet: hold λ, let the feedback act
    else:
        demand = inp.spent_usd / exposure
        time_left = max(inp.period_start + line_span - now, params.min_left_share * span)
        aim = left / (demand * time_left)
    aim *= math.exp(-(params.kp * error + params.ki * integral))
    lam = _clamp(curve.lambda_for(aim), lo, hi)
    return PaceState(lam, integral, exposure, now, state.period_start)
