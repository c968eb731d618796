"""The impact report's follow-up (docs/IMPACT.md): what the model really changed since it was activated.

``profiling.impact_followup_s`` after a model is activated by profiling, the report stored with it
(``model_impacts``, gateway/store/impact.py) is repeated with the realised figures from the request log:

- the model's **share** of the successful ``auto`` requests logged since its activation;
- their **mean normalised cost** (router cost of the model that served each, in units of the dearest model of
  the pool the report was computed for, as the report's) and their mean cost in USD;
- where feedback or graded outcomes exist (``POST /v1/feedback``, from the key that made the request), the
  **mean error** (1 − score) of all of them and of the model's own.

Next to them, what was **predicted**: the report's figures at the λ the traffic really had (each request's λ:
keys' own, paced keys' moving λ, per-request overrides), recomputed from the pool, costs and cluster mix the
report used; and, to tell a changed traffic mix from a wrong profile, the same prediction on the realised
cluster mix.

Run by :class:`ImpactFollowups`: the scheduler inside ``serve`` (:class:`profiling.schedule.ReprofileScheduler`)
calls :meth:`ImpactFollowups.run_due` under the ``impact-followup`` lease (one replica at a time, as re-profiling);
``uniroute impact NAME --now`` and ``POST /admin/models/{name}/impact`` compute one at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime
from typing import Any

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import ConflictError, InvalidRequestError, NotFoundError
from gateway.store import impact as impact_sql
from gateway.store import lease
from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.tables import ModelImpact, utcnow
from routing.artifact import RouterArtifact
from routing.impact import (
    Served,
    impact_report,
    lambda_mix,
    predicted_at_mix,
    realised_figures,
    rounded_lambda,
)
from routing.policy import PoolModel

logger = logging.getLogger("uniroute.impact")


def cluster_weights(groups: list[tuple[int | None, int]], k: int) -> np.ndarray:
    """Share of requests per cluster from (cluster, requests) groups (None and out-of-range ignored)."""
    counts = np.zeros(k)
    for c, n in groups:
        if c is not None and 0 <= c < k:
            counts[c] += n
    total = counts.sum()
    return counts / total if total > 0 else counts
LEASE_NAME = "impact-followup"
#: at most this many λ rows in the follow-up's per-λ table (the busiest)
PER_LAMBDA_ROWS = 12


def compute_followup(row: ModelImpact, store: Store, art: RouterArtifact | None,
                     now: datetime | None = None) -> dict[str, Any]:
    """The follow-up of an activated report ``row``: realised figures since its activation, and the prediction at
    the realised λ mix (None when the artifact that computed the report is not the one loaded)."""
    if row.activated_at is None:
        raise InvalidRequestError(f"the impact report of {row.model_name!r} was never activated: activate it first "
                                  f"(`uniroute profile {row.model_name} --activate`)", code="not_activated")
    now = now or utcnow()
    logged = impact_sql.auto_requests_since(store, row.activated_at, now)
    served = [Served(g.routed_model, g.lam, g.requests, g.cost_usd, g.priced, g.scored, g.error_sum) for g in logged]
    inputs = row.inputs or {}
    model = row.model_name
    costs = {str(m["name"]): float(m["cost"]) for m in inputs.get("pool", [])}
    if "candidate_cost" in inputs:
        costs[model] = float(inputs["candidate_cost"])
    top = max(costs.values(), default=0.0)
    norm = {name: c / top for name, c in costs.items()} if top > 0 else {}
    out: dict[str, Any] = {"computed_at": now.isoformat(), "since": row.activated_at.isoformat(),
                           "hours": round((now - row.activated_at).total_seconds() / 3600.0, 3),
                           "realised": realised_figures(model, served, norm),
                           "predicted": None, "predicted_on_realised_clusters": None, "per_lambda": [], "note": None}
    default_lambda = float(inputs.get("default_lambda", 0.0))
    mix = lambda_mix(served, default_lambda)
    if row.report is None or not inputs.get("pool"):
        out["note"] = f"no prediction to compare with: {row.report_error or 'the report was not computed'}"
        return out
    if art is None or art.version != row.artifact_version:
        out["note"] = (f"the report was computed with router artifact {row.artifact_version}, not the one loaded "
                       f"({art.version if art is not None else 'none'}): realised figures only")
        return out
    pool = [PoolModel(str(m["name"]), float(m["cost"]), np.asarray(m["psi"], dtype=np.float64))
            for m in inputs["pool"]]
    cand = PoolModel(model, costs[model], np.asarray(row.profiles[row.variant]["psi"], dtype=np.float64))
    z_val = art.membership(art.val_embeddings, row.variant)
    traffic = np.asarray(row.report["traffic"], dtype=np.float64)
    out["predicted"] = predicted_at_mix(z_val, pool, cand, traffic, mix)
    realised_mix = cluster_weights([(g.cluster, g.requests) for g in logged], art.k)
    if realised_mix.sum() > 0:
        out["predicted_on_realised_clusters"] = predicted_at_mix(z_val, pool, cand, realised_mix, mix)
    busiest = sorted(mix.items(), key=lambda kv: -kv[1])[:PER_LAMBDA_ROWS]
    if busiest:
        rep = impact_report(z_val, pool, cand, traffic, [("mix", lam) for lam, _ in busiest])
        mine: dict[float, int] = {}
        for s in served:
            if s.model == model:
                lam = rounded_lambda(s.lam, default_lambda)
                mine[lam] = mine.get(lam, 0) + s.requests
        for (lam, n), pred in zip(busiest, rep.lambdas, strict=True):
            out["per_lambda"].append({"lambda": lam, "requests": n, "predicted_share": pred.traffic_share,
                                      "realised_share": mine.get(lam, 0) / n})
    if not served:
        out["note"] = "no successful `auto` request was logged since the activation"
    return out


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(float(v), fmt)


def format_impact(d: dict[str, Any]) -> str:
    """A stored impact report (:func:`gateway.store.impact.impact_dict`) and its follow-up as text."""
    from routing.impact import ImpactReport

    lines = [f"impact report of {d['model']} ({d['status']}; reported {d['created_at']}"
             + (f", activated {d['activated_at']}" if d.get("activated_at") else "") + ")"]
    if d.get("report"):
        lines += ["", ImpactReport.from_dict(d["report"]).table()]
    else:
        lines.append(f"no impact report: {d.get('report_error')}")
    f = d.get("followup")
    if not f:
        lines += ["", "no follow-up yet" + (" (due profiling.impact_followup_s after the activation; "
                                            "`uniroute impact NAME --now` computes it now)"
                                            if d.get("activated_at") else " (not activated)")]
        return "\n".join(lines)
    r, p, q = f["realised"], f.get("predicted") or {}, f.get("predicted_on_realised_clusters") or {}
    lines += ["", f"follow-up computed {f['computed_at']}: {r['requests']} `auto` requests in the {f['hours']:.1f} h "
                  "since the activation",
              "", "| figure | predicted | predicted on the realised cluster mix | realised | requests |",
              "|---|---|---|---|---|",
              f"| share of `auto` traffic served by {d['model']} | {_pct(p.get('traffic_share'))} | "
              f"{_pct(q.get('traffic_share'))} | {_pct(r['traffic_share'])} | {r['requests']} |",
              f"| mean normalised cost | {_num(p.get('mean_cost'))} | {_num(q.get('mean_cost'))} | "
              f"{_num(r['mean_cost'])} | {r['priced_requests']} |",
              f"| mean cost per request (USD) | — | — | {_num(r['mean_cost_usd'], '.6f')} | {r['requests']} |",
              f"| mean error, all `auto` traffic | {_num(p.get('mean_error'))} | {_num(q.get('mean_error'))} | "
              f"{_num(r['mean_error'])} | {r['scored_requests']} with feedback |",
              f"| mean error of {d['model']}'s traffic | {_num(p.get('candidate_error'))} | "
              f"{_num(q.get('candidate_error'))} | {_num(r['model_error'])} | {r['model_scored_requests']} with "
              "feedback |"]
    if f.get("per_lambda"):
        lines += ["", "| λ | requests | predicted share | realised share |", "|---|---|---|---|"]
        lines += [f"| {x['lambda']:g} | {x['requests']} | {_pct(x['predicted_share'])} | {_pct(x['realised_share'])} |"
                  for x in f["per_lambda"]]
    if f.get("note"):
        lines += ["", f"note: {f['note']}"]
    return "\n".join(lines)


class ImpactFollowups:
    """Computes, stores and shows follow-ups. One instance per process; the artifact is loaded once, lazily."""

    def __init__(self, config: GatewayConfig, store: Store, *, artifact: RouterArtifact | None = None,
                 holder: str | None = None) -> None:
        self.config = config
        self.store = store
        self._artifact = artifact
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running = threading.Lock()

    @property
    def delay_s(self) -> float:
        return self.config.profiling.impact_followup_s

    def artifact(self) -> RouterArtifact | None:
        if self._artifact is None:
            from profiling.profiler import load_artifact

            try:
                self._artifact = load_artifact(self.config)
            except Exception as exc:  # no UniRoute router: realised figures only
                logger.warning("impact follow-up without the router artifact (%s: %s)", type(exc).__name__, exc)
                return None
        return self._artifact

    def _run(self, impact_id: int, now: datetime | None = None) -> dict[str, Any]:
        row = impact_sql.get_impact(self.store, impact_id)
        if row is None:
            raise NotFoundError(f"no impact report {impact_id}", code="no_report")
        followup = compute_followup(row, self.store, self.artifact(), now)
        impact_sql.save_followup(self.store, impact_id, followup, now)
        stored = impact_sql.get_impact(self.store, impact_id)
        assert stored is not None
        return impact_sql.impact_dict(stored)

    def run_due(self, now: datetime | None = None) -> list[dict[str, Any]] | None:
        """Every follow-up that is due, under the lease (blocking: call it in a thread). None when another holder
        has the lease; [] when the follow-up is off or nothing is due."""
        if self.delay_s <= 0:
            return []
        if not self._running.acquire(blocking=False):
            return None
        try:
            if not lease.acquire(self.store, LEASE_NAME, self.holder, self.config.profiling.lease_ttl_s):
                return None
            try:
                done = []
                for impact_id in impact_sql.due_followups(self.store, self.delay_s, now):
                    try:
                        done.append(self._run(impact_id, now))
                    except Exception:
                        logger.exception("impact follow-up %d failed", impact_id)
                return done
            finally:
                lease.release(self.store, LEASE_NAME, self.holder)
        finally:
            self._running.release()

    def run_now(self, model: str) -> dict[str, Any]:
        """The follow-up of ``model``'s activated report, computed now (``--now``)."""
        row = self._latest(model)
        if row.status != "activated":
            raise ConflictError(f"{model!r} has no activated impact report (latest: {row.status}); activate it with "
                                f"`uniroute profile {model} --activate`", code="not_activated")
        return self._run(row.id)

    def show(self, model: str) -> dict[str, Any]:
        return impact_sql.impact_dict(self._latest(model))

    def _latest(self, model: str) -> ModelImpact:
        catalog.get_model(self.store, model)  # 404 listing the known models
        row = impact_sql.latest_impact(self.store, model)
        if row is None:
            raise NotFoundError(f"no impact report for {model!r}: profile it (`uniroute profile {model}` or "
                                f"POST /admin/models/{model}/profile)", code="no_report")
        return row
