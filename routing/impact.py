"""The impact of adding a profiled model to the pool, before it serves (docs/IMPACT.md).

Given the candidate's Ψ, the pool it joins and the cluster mix of recent traffic, the report says, per
cluster, the candidate's expected error against the pool's best; at each λ of a grid (and each key's λ),
the clusters it would win, its expected share of the traffic, and the expected change in the traffic's mean
normalised cost and mean expected error. Pure numpy: the caller reads the request log (the clusters of
recent ``auto`` requests) and the keys.

Traffic share. The request log keeps each request's most likely cluster, not its full membership z(x). The
artifact's validation prompts stand in for the prompts of each cluster: a validation prompt whose most
likely cluster is k is weighted by ``traffic[k] / (validation prompts of cluster k)``, so the weighted
validation set has the recent traffic's cluster mix, and each prompt is routed with its own z, as the
gateway routes (:class:`routing.decision.Decider`). Clusters of the traffic without a validation prompt are
left out (``coverage`` < 1 says how much traffic that is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routing import figures
from routing.decision import Decider, expected_errors
from routing.policy import PoolModel

#: The report's default λ grid.
DEFAULT_IMPACT_GRID: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class LambdaImpact:
    label: str  # "grid" or the key's name
    lam: float
    clusters_won: list[int]  # clusters whose pure member would be routed to the candidate first
    traffic_share: float  # expected share of the traffic routed to the candidate
    mean_cost_before: float  # expected mean normalised cost (by the dearest model of pool + candidate)
    mean_cost_after: float
    mean_error_before: float  # expected mean expected error
    mean_error_after: float
    candidate_error: float | None = None  # expected error of the traffic routed to the candidate (None: none is)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "lambda": self.lam, "clusters_won": self.clusters_won,
                "traffic_share": self.traffic_share, "mean_cost_before": self.mean_cost_before,
                "mean_cost_after": self.mean_cost_after, "mean_error_before": self.mean_error_before,
                "mean_error_after": self.mean_error_after, "candidate_error": self.candidate_error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LambdaImpact:
        return cls(label=str(d["label"]), lam=float(d["lambda"]), clusters_won=[int(c) for c in d["clusters_won"]],
                   traffic_share=float(d["traffic_share"]), mean_cost_before=float(d["mean_cost_before"]),
                   mean_cost_after=float(d["mean_cost_after"]), mean_error_before=float(d["mean_error_before"]),
                   mean_error_after=float(d["mean_error_after"]), candidate_error=d.get("candidate_error"))


@dataclass
class ImpactReport:
    model: str
    psi: list[float]  # the candidate's Ψ_k
    pool_best: list[float]  # min over the pool of Ψ_k
    pool_best_model: list[str]  # which model that is
    traffic: list[float]  # share of recent traffic per cluster
    coverage: float  # share of the traffic whose cluster has validation prompts
    lambdas: list[LambdaImpact] = field(default_factory=list)
    traffic_requests: int = 0  # logged requests the traffic mix comes from (0: the validation prompts' own mix)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "psi": self.psi, "pool_best": self.pool_best,
                "pool_best_model": self.pool_best_model, "traffic": self.traffic, "coverage": self.coverage,
                "traffic_requests": self.traffic_requests, "lambdas": [x.as_dict() for x in self.lambdas]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImpactReport:
        return cls(model=str(d["model"]), psi=list(d["psi"]), pool_best=list(d["pool_best"]),
                   pool_best_model=list(d["pool_best_model"]), traffic=list(d["traffic"]),
                   coverage=float(d["coverage"]), lambdas=[LambdaImpact.from_dict(x) for x in d["lambdas"]],
                   traffic_requests=int(d.get("traffic_requests", 0)))

    def table(self) -> str:
        """The report as Markdown tables: per cluster, then per λ."""
        rows = ["| cluster | traffic | Ψ (candidate) | pool best | best model |", "|---|---|---|---|---|"]
        for k, (p, b, m, w) in enumerate(zip(self.psi, self.pool_best, self.pool_best_model, self.traffic,
                                             strict=True)):
            mark = " **<**" if p < b else ""
            rows.append(f"| {k} | {100 * w:.1f}% | {p:.3f}{mark} | {b:.3f} | {m} |")
        source = (f"{self.traffic_requests} logged `auto` requests" if self.traffic_requests
                  else "no logged `auto` request: the validation prompts' own mix")
        rows += ["", f"traffic mix: {source}; covered by validation prompts: {100 * self.coverage:.1f}%", "",
                 "| λ | for | clusters won | traffic share | mean cost before → after | mean error before → after |",
                 "|---|---|---|---|---|---|"]
        for x in self.lambdas:
            won = ", ".join(map(str, x.clusters_won)) or "none"
            rows.append(f"| {x.lam:g} | {x.label} | {won} | {100 * x.traffic_share:.1f}% | "
                        f"{x.mean_cost_before:.4f} → {x.mean_cost_after:.4f} | "
                        f"{x.mean_error_before:.4f} → {x.mean_error_after:.4f} |")
        return "\n".join(rows)


def cluster_traffic(clusters: Sequence[int | None], k: int) -> np.ndarray:
    """Share of requests per cluster from the request log's ``cluster`` column (None and out-of-range ignored)."""
    counts = np.zeros(k)
    for c in clusters:
        if c is not None and 0 <= c < k:
            counts[c] += 1
    total = counts.sum()
    return counts / total if total > 0 else counts


def impact_report(z_val: np.ndarray, pool: Sequence[PoolModel], candidate: PoolModel, traffic: np.ndarray | None,
                  lambdas: Sequence[tuple[str, float]]) -> ImpactReport:
    """The report for ``candidate`` joining ``pool`` (its profiled models), over validation memberships ``z_val``
    (n, K) reweighted to ``traffic`` (K shares; None or all zero: the validation set's own mix)."""
    if candidate.psi is None:
        raise ValueError(f"{candidate.name!r} has no profile")
    members = [m for m in pool if m.psi is not None and m.name != candidate.name]
    if not members:
        raise ValueError("the pool has no other profiled model to compare with")
    z = np.asarray(z_val, dtype=np.float64)
    k = z.shape[1]
    psi_pool = np.stack([np.asarray(m.psi, dtype=np.float64) for m in members])
    psi_new = np.asarray(candidate.psi, dtype=np.float64)
    if psi_pool.shape[1] != k or len(psi_new) != k:
        raise ValueError(f"profiles and memberships disagree on the number of clusters ({k})")
    best = psi_pool.argmin(axis=0)
    names = [m.name for m in members] + [candidate.name]
    psi_all = np.vstack([psi_pool, psi_new[None, :]])
    with_c = Decider([m.cost for m in members] + [candidate.cost], names)
    without = Decider([m.cost for m in members], names[:-1])
    scale = float(max(m.cost for m in members)) / float(max(candidate.cost, *(m.cost for m in members)))
    cost_without = without.costs * scale  # both in units of the dearest model of pool + candidate
    cost_with = with_c.costs
    err = expected_errors(z, psi_all)  # (n, m + 1)
    top = z.argmax(axis=1)
    per_cluster = np.bincount(top, minlength=k).astype(np.float64)
    t = np.asarray(traffic, dtype=np.float64) if traffic is not None else np.zeros(k)
    if t.sum() <= 0:
        t = per_cluster / per_cluster.sum()
    t = t / t.sum()
    covered = per_cluster > 0
    coverage = float(t[covered].sum())
    w = np.where(covered[top], t[top] / np.maximum(per_cluster[top], 1.0), 0.0)
    w = w / w.sum()
    eye = np.eye(k)
    pure = expected_errors(eye, psi_all)  # (K, m + 1): a pure member of each cluster
    report = ImpactReport(model=candidate.name, psi=psi_new.tolist(), pool_best=psi_pool.min(axis=0).tolist(),
                          pool_best_model=[members[j].name for j in best], traffic=t.tolist(), coverage=coverage)
    rows = np.arange(len(z))
    for label, lam in lambdas:
        after = with_c.choose(err, lam)
        before = without.choose(err[:, :-1], lam)
        won = np.flatnonzero(with_c.choose(pure, lam) == len(members)).tolist()
        to_c = after == len(members)
        share_c = float(w @ to_c)
        report.lambdas.append(LambdaImpact(
            label=label, lam=float(lam), clusters_won=[int(x) for x in won],
            traffic_share=share_c,
            mean_cost_before=float(w @ cost_without[before]), mean_cost_after=float(w @ cost_with[after]),
            mean_error_before=float(w @ err[rows, before]), mean_error_after=float(w @ err[rows, after]),
            candidate_error=float((w * to_c) @ err[:, -1]) / share_c if share_c > 0 else None))
    return report


# --------------------------------------------------------------------------------------- the follow-up
@dataclass(frozen=True)
class Served:
    """Logged ``auto`` requests as the follow-up reads them: those served by one model at one λ (a group, summed)."""

    model: str | None  # the model that served them
    lam: float | None  # the λ they were routed with (None: the router's default)
    requests: int = 1
    cost_usd: float = 0.0  # Σ logged cost
    priced: int = 0  # requests with a logged cost
    scored: int = 0  # requests with feedback / a graded outcome
    error_sum: float = 0.0  # Σ (1 − score) over those


def rounded_lambda(lam: float | None, default_lambda: float, digits: int = 4) -> float:
    """λ as the follow-up groups it: the default for None, rounded to ``digits`` significant digits (a paced key's λ
    moves continuously)."""
    return float(f"{(default_lambda if lam is None else float(lam)):.{digits}g}")


def lambda_mix(requests: Sequence[Served], default_lambda: float) -> dict[float, int]:
    """How many requests were routed at each (rounded) λ."""
    out: dict[float, int] = {}
    for r in requests:
        lam = rounded_lambda(r.lam, default_lambda)
        out[lam] = out.get(lam, 0) + r.requests
    return out


def predicted_at_mix(z_val: np.ndarray, pool: Sequence[PoolModel], candidate: PoolModel, traffic: np.ndarray | None,
                     mix: dict[float, int]) -> dict[str, float | None]:
    """The report's prediction (share, mean normalised cost and error after, the candidate's error on its share)
    averaged over a λ mix ``{λ: requests}``, for the cluster mix ``traffic``."""
    total = sum(mix.values())
    if total == 0:
        return {"traffic_share": None, "mean_cost": None, "mean_error": None, "candidate_error": None}
    rep = impact_report(z_val, pool, candidate, traffic, [("mix", lam) for lam in mix])
    weights = np.array(list(mix.values()), dtype=np.float64) / total
    share = float(sum(wt * x.traffic_share for wt, x in zip(weights, rep.lambdas, strict=True)))
    cand = sum(wt * x.traffic_share * x.candidate_error for wt, x in zip(weights, rep.lambdas, strict=True)
               if x.candidate_error is not None)
    return {"traffic_share": share,
            "mean_cost": float(sum(wt * x.mean_cost_after for wt, x in zip(weights, rep.lambdas, strict=True))),
            "mean_error": float(sum(wt * x.mean_error_after for wt, x in zip(weights, rep.lambdas, strict=True))),
            "candidate_error": float(cand) / share if share > 0 else None}


def realised_figures(model: str, requests: Sequence[Served], costs: dict[str, float]) -> dict[str, Any]:
    """What the log says since activation: the model's share of the ``auto`` requests, their mean normalised cost
    (``costs``: router cost per model, normalised by the dearest; a model without one is left out of that mean),
    mean cost in USD (of the requests with a logged cost), and, over the requests with a score, the mean error
    (1 − score) overall and on the model's."""
    n = sum(r.requests for r in requests)
    mine = [r for r in requests if r.model == model]
    n_mine = sum(r.requests for r in mine)
    priced = [(costs[r.model], r.requests) for r in requests if r.model is not None and r.model in costs]
    n_priced = sum(c for _, c in priced)
    n_usd = sum(r.priced for r in requests)
    n_scored = sum(r.scored for r in requests)
    n_scored_mine = sum(r.scored for r in mine)
    return {"requests": n, "model_requests": n_mine, "traffic_share": n_mine / n if n else None,
            "mean_cost": sum(c * k for c, k in priced) / n_priced if n_priced else None, "priced_requests": n_priced,
            "mean_cost_usd": sum(r.cost_usd for r in requests) / n_usd if n_usd else None,
            "mean_error": sum(r.error_sum for r in requests) / n_scored if n_scored else None,
            "scored_requests": n_scored,
            "model_error": sum(r.error_sum for r in mine) / n_scored_mine if n_scored_mine else None,
            "model_scored_requests": n_scored_mine}


def plot_report(report: ImpactReport, path: Any) -> Any:
    """Per cluster, the candidate's Ψ against the pool's best (bars: traffic share); per λ, its traffic share."""
    plt = figures.pyplot()

    k = np.arange(len(report.psi))
    fig, ax = plt.subplots(2, 1, figsize=(9, 7))
    ax[0].bar(k, report.traffic, color="lightgrey", label="share of recent traffic")
    ax0 = ax[0].twinx()
    ax0.plot(k, report.psi, "o", label=f"Ψ {report.model}")
    ax0.plot(k, report.pool_best, "x", label="pool best Ψ")
    ax0.set_ylabel("expected error")
    ax[0].set_xlabel("cluster")
    ax[0].set_ylabel("traffic share")
    ax0.legend(loc="upper right")
    grid = [x for x in report.lambdas if x.label == "grid"]
    ax[1].plot([x.lam for x in grid], [100 * x.traffic_share for x in grid], "o-", label="grid")
    for x in report.lambdas:
        if x.label != "grid":
            ax[1].plot([x.lam], [100 * x.traffic_share], "s", label=f"key {x.label}")
    ax[1].set_xscale("symlog", linthresh=0.01)
    ax[1].set_xlabel("λ")
    ax[1].set_ylabel(f"expected traffic share of {report.model} (%)")
    ax[1].legend(loc="upper right")
    return figures.save(fig, path, dpi=100)
