"""A budget period of traffic from a routing benchmark, replayed through the real chat service, time-compressed.

What runs is the gateway's request path as ``uniroute serve`` composes it (gateway/app.py), minus HTTP:
:class:`~gateway.serving.service.ChatService` with the registry of ``replay_models``, the UniRoute policy and
embedder of the artifact, the Forwarder, and the store-backed key authenticator, budget guard (reservations,
the hard cap) and budget pacer on a real database. The upstream is the replay server's own ASGI app
(replay/app.py) called in process through httpx: the same answers and token usage as ``uniroute replay`` on
loopback, without sockets.

Time is virtual: requests arrive as a Poisson process over one budget period (``day`` or ``month``) at
``rate`` requests per simulated hour, multiplied inside each burst window; the budget guard and the pacer
read a clock that jumps to each arrival, so a period runs in seconds. Requests are sent one after another.

What is measured: the paced key's spend and λ over the period, the 429s it got, and its mean score (the
benchmark's recorded score of the model that answered). The reference is the best *fixed* λ in hindsight:
the same requests routed by the same policy at each λ of a grid, costed with the same prices and token
counts, and the most accurate of those that spend no more than the paced key did.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from gateway.access.auth import KeyAuthenticator, create_key
from gateway.access.budget import SqlBudgetGuard, period_end_for, period_start_for
from gateway.access.pacing import SqlPacer
from gateway.config import GatewayConfig, parse_config
from gateway.errors import GatewayError
from gateway.pacing import PaceParams
from gateway.protocol import parse_chat_request
from gateway.serving.forwarding import Forwarder
from gateway.serving.interfaces import MemorySink, RequestRecord
from gateway.serving.registry import ModelEntry, Registry, RegistrySnapshot, with_profiles
from gateway.serving.router import CostCurves, RouterBundle, build_router
from gateway.serving.service import ChatContext, ChatService
from gateway.store.engine import Store
from replay.app import create_replay_app, estimate_tokens
from routing import figures
from routing.artifact import UniRoutePolicy
from routing.dataset import BenchmarkDataset, load_dataset
from routing.decision import Decider, expected_errors

REPLAY_BASE = "http://replay.in-process/v1"
#: The fixed-λ grid of the hindsight reference: 0, then log-spaced from 1e-3 to 100.
HINDSIGHT_GRID: tuple[float, ...] = (0.0, *(10 ** (-3 + 5 * i / 399) for i in range(400)))


@dataclass(frozen=True)
class Burst:
    """Traffic × ``factor`` from ``start`` for ``length`` (shares of the period)."""

    start: float
    length: float
    factor: float

    @classmethod
    def parse(cls, text: str) -> Burst:
        parts = text.split(":")
        try:
            start, length, factor = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"--burst {text!r}: expected START:LENGTH:FACTOR (shares of the period and a "
                             "multiplier, e.g. 0.3:0.1:4)") from None
        if not (0 <= start < 1 and 0 < length <= 1 - start and factor > 0 and math.isfinite(factor)):
            raise ValueError(f"--burst {text!r}: need 0 <= START < 1, 0 < LENGTH <= 1 - START, FACTOR > 0")
        return cls(start, length, factor)


@dataclass
class SimulationResult:
    period: str
    period_s: float
    budget_usd: float
    n_requests: int
    t: np.ndarray  # seconds since the period's start, per request
    lam: np.ndarray  # λ each request was routed with
    cost: np.ndarray  # USD each request cost (0 when refused)
    score: np.ndarray  # recorded score of the model that answered (nan when refused)
    status: np.ndarray  # HTTP status per request
    seconds: float  # wall time of the run
    hindsight: dict[str, Any] = field(default_factory=dict)

    @property
    def spend(self) -> float:
        return float(self.cost.sum())

    @property
    def refused_429(self) -> int:
        return int((self.status == 429).sum())

    @property
    def mean_score(self) -> float:
        ok = self.status == 200
        return float(self.score[ok].mean()) if ok.any() else math.nan

    def summary(self) -> dict[str, Any]:
        h = self.hindsight
        return {
            "period": self.period, "requests": self.n_requests, "budget_usd": self.budget_usd,
            "spend_usd": self.spend, "spend_share_of_budget": self.spend / self.budget_usd if self.budget_usd else None,
            "status_429": self.refused_429, "errors": int((self.status != 200).sum()),
            "mean_score": self.mean_score, "lambda_min": float(self.lam.min()), "lambda_max": float(self.lam.max()),
            "lambda_median": float(np.median(self.lam)),
            "best_fixed_lambda": h.get("lambda"), "best_fixed_spend_usd": h.get("spend_usd"),
            "best_fixed_mean_score": h.get("mean_score"),
            "score_minus_best_fixed_points": (100 * (self.mean_score - h["mean_score"])) if "mean_score" in h else None,
            "fixed_frontier_at_same_spend": h.get("interpolated_mean_score"),
            "feasible_spend_usd": h.get("feasible_spend_usd"), "wall_seconds": self.seconds,
        }


def arrivals(period_s: float, rate_per_hour: float, bursts: Sequence[Burst], rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds into the period) of a Poisson process with the bursts' rate profile (thinning)."""
    peak = rate_per_hour / 3600.0 * max([1.0, *(b.factor for b in bursts)])
    n = rng.poisson(peak * period_s)
    t = np.sort(rng.uniform(0.0, period_s, size=n))
    share = t / period_s
    factor = np.ones(n)
    for b in bursts:
        inside = (share >= b.start) & (share < b.start + b.length)
        factor[inside] *= b.factor
    keep = rng.uniform(0.0, 1.0, size=n) < factor * (rate_per_hour / 3600.0) / peak
    return t[keep]


class InProcessReplay:
    """An :class:`~gateway.serving.forwarding.Upstream` that calls the replay server's ASGI app in process."""

    def __init__(self, dataset: BenchmarkDataset) -> None:
        import httpx

        self.app = create_replay_app(dataset)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=REPLAY_BASE)

    def register(self, snapshot: RegistrySnapshot) -> None:
        return None

    async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        model = str(entry.litellm_params["model"]).removeprefix("openai/")
        r = await self.client.post("/chat/completions", json={**params, "model": model, "messages": messages})
        if r.status_code != 200:
            raise GatewayError(f"replay upstream answered {r.status_code}: {r.text[:200]}")
        return ChatCompletion.model_validate(r.json())

    async def stream(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        raise GatewayError("the simulation sends non-streaming requests only")

    async def call(self, entry: ModelEntry, endpoint: str, payload: Mapping[str, Any], stream: bool) -> Any:
        raise GatewayError("the simulation sends chat completions only")

    async def aclose(self) -> None:
        await self.client.aclose()


class VirtualClock:
    def __init__(self, start: datetime) -> None:
        self.start = start
        self.offset_s = 0.0

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=self.offset_s)


def _config(dataset: Path, artifact: Path, database_url: str) -> GatewayConfig:
    return parse_config({
        "database_url": database_url, "auth": {"mode": "keys"},
        "router": {"policy": "uniroute", "artifact": str(artifact), "max_wait_ms": 0, "lambda_max": 100.0},
        "replay_models": {"dataset": str(dataset), "api_base": REPLAY_BASE},
        "fallback": {"max_attempts": 1, "cooldown_failures": 0},
    }, base_dir=Path.cwd(), source="simulation")


def _pair_costs(ds: BenchmarkDataset, rows: np.ndarray, entries: Sequence[ModelEntry], replay: InProcessReplay
                ) -> np.ndarray:
    """USD of each (request, model) pair as the gateway prices it: the replay's token counts × the entry's prices."""
    state = replay.app.state.replay
    out = np.zeros((len(rows), len(entries)))
    for j, e in enumerate(entries):
        model = str(e.litellm_params["model"]).removeprefix("openai/")
        col = state.model_col[model]
        for i, row in enumerate(rows):
            prompt = ds.prompts[row]
            ans = state.answer(model, col, prompt)
            out[i, j] = estimate_tokens(len(prompt)) * e.input_cost_per_token + \
                ans.completion_tokens * e.output_cost_per_token
    return out


def _check(period: str, rate_per_hour: float) -> None:
    if period not in ("day", "month"):
        raise ValueError(f"--period must be day or month, got {period!r}")
    if not rate_per_hour > 0:
        raise ValueError(f"--rate must be > 0 requests per hour, got {rate_per_hour}")


def _dataset(dataset: str | Path | BenchmarkDataset) -> BenchmarkDataset:
    return dataset if isinstance(dataset, BenchmarkDataset) else load_dataset(dataset)


def _period(period: str) -> tuple[datetime, float]:
    """The current budget period's start and its length in seconds."""
    start = period_start_for(period, datetime.now(UTC))
    return start, (period_end_for(period, start) - start).total_seconds()


def _requests(ds: BenchmarkDataset, policy: Any, period_s: float, rate_per_hour: float, bursts: Sequence[Burst],
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The period's requests: arrival times and the dataset rows they ask (prompts outside the artifact's
    validation set), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    t = arrivals(period_s, rate_per_hour, bursts, rng)
    if len(t) == 0:
        raise ValueError("no request arrives in the period at this --rate")
    if not isinstance(policy, UniRoutePolicy):
        raise ValueError("the simulation needs a UniRoute artifact (router.policy uniroute)")
    val = set(policy.artifact.val_prompt_ids)
    pool_rows = np.array([i for i, pid in enumerate(ds.prompt_ids) if pid not in val])
    rows = pool_rows[rng.permutation(len(pool_rows))[np.arange(len(t)) % len(pool_rows)]]
    return t, rows


async def _routing(ds: BenchmarkDataset, cfg: GatewayConfig) -> tuple[Registry, RouterBundle, InProcessReplay]:
    """The registry (with the artifact's profiles), the router and the in-process replay upstream."""
    registry = Registry.from_config(cfg)
    bundle: RouterBundle = await build_router(cfg)
    registry.replace(with_profiles(registry.snapshot.entries, bundle.profiles))
    return registry, bundle, InProcessReplay(ds)


async def simulate(dataset: str | Path | BenchmarkDataset, artifact: str | Path, *, budget_usd: float,
                   period: str = "day", rate_per_hour: float = 100.0, bursts: Sequence[Burst] = (), seed: int = 0,
                   start_lambda: float = 0.1, database_url: str | None = None,
                   params: PaceParams | None = None, progress: bool = False) -> SimulationResult:
    """Run one period of paced traffic and the fixed-λ hindsight reference on the same requests.

    ``dataset`` is a benchmark folder or one already loaded (:func:`routing.dataset.load_dataset`)."""
    _check(period, rate_per_hour)
    if not budget_usd > 0 or not math.isfinite(budget_usd):
        raise ValueError(f"--budget must be a positive number of USD, got {budget_usd}")
    t_wall = time.perf_counter()
    ds = _dataset(dataset)
    with tempfile.TemporaryDirectory(prefix="uniroute-sim-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'sim.db'}"
        cfg = _config(ds.path, Path(artifact), url)
        store = Store(url)
        try:
            await asyncio.to_thread(store.upgrade)
            return await _run(ds, cfg, store, budget_usd=budget_usd, period=period, rate_per_hour=rate_per_hour,
                              bursts=bursts, seed=seed, start_lambda=start_lambda, params=params,
                              progress=progress, t_wall=t_wall)
        finally:
            await asyncio.to_thread(store.dispose)


async def fixed_lambda_frontier(dataset: str | Path | BenchmarkDataset, artifact: str | Path, *,
                                period: str = "day", rate_per_hour: float = 100.0, bursts: Sequence[Burst] = (),
                                seed: int = 0) -> dict[str, Any]:
    """The hindsight reference of :func:`simulate` alone, without the paced traffic: the requests that
    :func:`simulate` sends with the same dataset, artifact, period, rate, bursts and seed, routed at each fixed λ
    of :data:`HINDSIGHT_GRID`. ``feasible_spend_usd`` (the cheapest and the dearest spend) is the range a
    budget for that traffic can be paced in. No database and no chat service: the routing decisions only."""
    _check(period, rate_per_hour)
    ds = _dataset(dataset)
    cfg = _config(ds.path, Path(artifact), "sqlite://")
    registry, bundle, replay = await _routing(ds, cfg)
    try:
        _, period_s = _period(period)
        _, rows = _requests(ds, bundle.policy, period_s, rate_per_hour, bursts, seed)
        return await _hindsight(ds, rows, registry, bundle, replay, None)
    finally:
        await replay.aclose()
        await bundle.aclose()


async def _run(ds: BenchmarkDataset, cfg: GatewayConfig, store: Store, *, budget_usd: float, period: str,
               rate_per_hour: float, bursts: Sequence[Burst], seed: int, start_lambda: float,
               params: PaceParams | None, progress: bool, t_wall: float) -> SimulationResult:
    registry, bundle, replay = await _routing(ds, cfg)
    forwarder = Forwarder(max_attempts=1, upstream=replay)
    registry.on_replace(forwarder.register)
    start, period_s = _period(period)
    clock = VirtualClock(start)
    pacer = SqlPacer(store, interval_s=cfg.router.pace_interval_s, params=params, clock=clock)
    sink = MemorySink(maxlen=10**7)
    service = ChatService(registry, bundle.policy, forwarder, embed=bundle.embed,
                          authenticator=KeyAuthenticator(store), budget=SqlBudgetGuard(store, clock=clock),
                          sink=sink, pacer=pacer, cost_curve=CostCurves(bundle.policy, registry.pool))
    raw, _ = await asyncio.to_thread(create_key, store, "paced", default_lambda=start_lambda, budget_usd=budget_usd,
                                     period=period, budget_policy="pace",
                                     lambda_range=(cfg.router.lambda_min, cfg.router.lambda_max))
    t, rows = _requests(ds, bundle.policy, period_s, rate_per_hour, bursts, seed)
    col = {m: j for j, m in enumerate(ds.models)}
    n = len(t)
    lam, cost, score, status = np.zeros(n), np.zeros(n), np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    try:
        for i in range(n):
            clock.offset_s = float(t[i])
            req = parse_chat_request({"model": "auto", "messages": [{"role": "user", "content": ds.prompts[rows[i]]}]})
            ctx = ChatContext(request_id=f"sim-{i}", authorization=f"Bearer {raw}")
            try:
                res = await service.complete(req, ctx)
            except GatewayError as exc:
                status[i] = exc.status_code
                record: RequestRecord = sink.records[-1]
                lam[i] = record.lam if record.lam is not None else math.nan
                continue
            status[i] = 200
            lam[i] = res.lam if res.lam is not None else math.nan
            cost[i] = res.cost_usd or 0.0
            score[i] = ds.scores[rows[i], col[res.model]]
            if progress and (i + 1) % max(1, n // 20) == 0:
                print(f"simulate: {i + 1}/{n} requests, {100 * t[i] / period_s:.0f}% of the period, "
                      f"spend ${cost[: i + 1].sum():.4f} of ${budget_usd:g}, λ={lam[i]:.4g}", flush=True)
        result = SimulationResult(period=period, period_s=period_s, budget_usd=budget_usd, n_requests=n, t=t,
                                  lam=lam, cost=cost, score=score, status=status, seconds=0.0)
        result.hindsight = await _hindsight(ds, rows, registry, bundle, replay, result.spend)
    finally:
        await forwarder.aclose()
        await bundle.aclose()
    result.seconds = time.perf_counter() - t_wall
    return result


async def _hindsight(ds: BenchmarkDataset, rows: np.ndarray, registry: Registry, bundle: RouterBundle,
                     replay: InProcessReplay, spend: float | None) -> dict[str, Any]:
    """The fixed-λ reference: the same requests routed at each λ of :data:`HINDSIGHT_GRID` by the same decision
    (:class:`routing.decision.Decider` over the served pool's Ψ), costed as the gateway prices them; with the
    paced ``spend``, the best fixed λ that spends no more (without it, the grid only)."""
    assert bundle.embed is not None
    policy: Any = bundle.policy
    eligible = [e for e in registry.snapshot.entries if e.psi is not None and e.routable]
    names = [e.name for e in eligible]
    psi = np.stack([np.asarray(e.psi, dtype=np.float64) for e in eligible])
    decider = Decider([e.router_cost for e in eligible], names)
    z = np.stack([policy.membership(await bundle.embed(ds.prompts[r])) for r in rows])
    err = expected_errors(z, psi)
    costs = _pair_costs(ds, rows, eligible, replay)
    col = {m: j for j, m in enumerate(ds.models)}
    scores = ds.scores[rows][:, [col[m] for m in names]]
    idx = np.arange(len(rows))
    grid = np.asarray(HINDSIGHT_GRID)
    spends, means = np.zeros(len(grid)), np.zeros(len(grid))
    for g, lam in enumerate(grid):
        choice = decider.choose(err, float(lam))
        spends[g] = costs[idx, choice].sum()
        means[g] = scores[idx, choice].mean()
    out: dict[str, Any] = {"feasible_spend_usd": [float(spends.min()), float(spends.max())],
                           "grid": grid.tolist(), "grid_spend_usd": spends.tolist(), "grid_mean_score": means.tolist()}
    if spend is None:
        return out
    ok = spends <= spend * (1 + 1e-9)
    if ok.any():
        best = int(np.flatnonzero(ok)[np.argmax(means[ok])])
        out.update({"lambda": float(grid[best]), "spend_usd": float(spends[best]), "mean_score": float(means[best])})
        above = np.flatnonzero(~ok)
        if len(above):  # the fixed-λ frontier at exactly the paced spend: mixing the two neighbouring λ
            nxt = int(above[np.argmin(spends[above])])
            w = (spend - spends[best]) / (spends[nxt] - spends[best])
            out["interpolated_mean_score"] = float(means[best] + w * (means[nxt] - means[best]))
    return out


def plot(result: SimulationResult, path: str | Path, title: str = "") -> Path:
    """Spend, λ and quality over the period: one PNG with three panels."""
    plt = figures.pyplot()

    share = result.t / result.period_s
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(share, np.cumsum(result.cost), label="spend (paced key)")
    ax[0].plot([0, 1], [0, result.budget_usd], "--", color="grey", label="budget × elapsed share")
    ax[0].axhline(result.budget_usd, color="red", lw=0.8, label="budget")
    ax[0].set_ylabel("USD")
    ax[0].legend(loc="upper left")
    ax[1].plot(share, result.lam, lw=0.8)
    if result.hindsight.get("lambda") is not None:
        ax[1].axhline(result.hindsight["lambda"], color="grey", ls="--", label="best fixed λ in hindsight")
        ax[1].legend(loc="upper left")
    ax[1].set_ylabel("λ")
    ok = result.status == 200
    window = max(1, result.n_requests // 25)
    rolling = np.convolve(np.nan_to_num(result.score * ok), np.ones(window), "same") / np.maximum(
        np.convolve(ok.astype(float), np.ones(window), "same"), 1)
    ax[2].plot(share, 100 * rolling, lw=0.8, label=f"mean score, rolling {window} requests")
    ax[2].axhline(100 * result.mean_score, color="C0", ls=":", label=f"paced: {100 * result.mean_score:.2f}")
    if result.hindsight.get("mean_score") is not None:
        ax[2].axhline(100 * result.hindsight["mean_score"], color="grey", ls="--",
                      label=f"best fixed λ: {100 * result.hindsight['mean_score']:.2f}")
    ax[2].set_ylabel("score (points)")
    ax[2].set_xlabel("elapsed share of the period")
    ax[2].legend(loc="lower left")
    fig.suptitle(title or f"{result.n_requests} requests, budget ${result.budget_usd:g}/{result.period}")
    return figures.save(fig, path, dpi=100)

