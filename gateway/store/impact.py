"""The impact reports' SQL (``model_impacts``, docs/IMPACT.md) and what their follow-up reads of the request log.

- one row per profiling run that could activate its model: ``reported`` (waiting for ``--activate`` / a second
  call), ``activated`` (serving; its follow-up is due ``profiling.impact_followup_s`` after ``activated_at``) or
  ``superseded`` (a later run of the same model replaced it);
- the follow-up's evidence: every successful ``auto`` request logged since the activation, with the feedback
  the key that made it sent (the same pairing as re-profiling's, :func:`gateway.store.profiling.feedback_by_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gateway.store.engine import Store
from gateway.store.tables import Feedback, ModelImpact, RequestRow, utcnow


@dataclass(frozen=True)
class LoggedGroup:
    """The ``auto`` requests the follow-up reads, grouped by the model that served them, their λ and cluster."""

    routed_model: str | None
    lam: float | None
    cluster: int | None
    requests: int
    cost_usd: float  # the sum of the logged costs
    priced: int  # requests with a logged cost
    scored: int  # requests with feedback from the key that made them
    error_sum: float  # Σ (1 − score) over those


def impact_dict(row: ModelImpact) -> dict[str, Any]:
    return {"id": row.id, "model": row.model_name, "artifact_version": row.artifact_version, "variant": row.variant,
            "status": row.status, "source": row.source, "created_at": row.created_at.isoformat(),
            "activated_at": row.activated_at.isoformat() if row.activated_at else None,
            "report": row.report, "report_error": row.report_error, "followup": row.followup,
            "followup_at": row.followup_at.isoformat() if row.followup_at else None}


def save_impact(store: Store, *, model: str, artifact_version: str, variant: str, fingerprint: str, source: str,
                profiles: dict[str, Any], report: dict[str, Any] | None, report_error: str | None,
                inputs: dict[str, Any] | None, activated: bool) -> int:
    """Store a run's report; earlier ``reported`` rows of the model (and, when this one is activated, its earlier
    ``activated`` rows) become ``superseded``. Returns the row id."""
    now = utcnow()
    with store.session() as s:
        old = ["reported", "activated"] if activated else ["reported"]
        s.execute(sa.update(ModelImpact).where(ModelImpact.model_name == model, ModelImpact.status.in_(old))
                  .values(status="superseded"))
        row = ModelImpact(model_name=model, artifact_version=artifact_version, variant=variant,
                          status="activated" if activated else "reported", fingerprint=fingerprint, source=source,
                          profiles=profiles, report=report, report_error=report_error and report_error[:500],
                          inputs=inputs, created_at=now, activated_at=now if activated else None)
        s.add(row)
        s.flush()
        return int(row.id)


def pending_impact(store: Store, model: str) -> ModelImpact | None:
    """The model's latest ``reported`` row (waiting for activation), if any."""
    with store.session() as s:
        return s.scalars(sa.select(ModelImpact).where(ModelImpact.model_name == model,
                                                      ModelImpact.status == "reported")
                         .order_by(ModelImpact.id.desc())).first()


def mark_activated(store: Store, impact_id: int) -> bool:
    """``reported`` → ``activated`` now (earlier ``activated`` rows of the model are superseded); False when the row
    is no longer ``reported`` (someone else activated or replaced it)."""
    now = utcnow()
    with store.session() as s:
        row = s.get(ModelImpact, impact_id)
        if row is None or row.status != "reported":
            return False
        s.execute(sa.update(ModelImpact).where(ModelImpact.model_name == row.model_name,
                                               ModelImpact.status == "activated").values(status="superseded"))
        res = s.execute(sa.update(ModelImpact).where(ModelImpact.id == impact_id, ModelImpact.status == "reported")
                        .values(status="activated", activated_at=now))
        return getattr(res, "rowcount", 0) == 1


def mark_reported(store: Store, impact_id: int) -> None:
    """Undo :func:`mark_activated` when the activation itself failed."""
    with store.session() as s:
        s.execute(sa.update(ModelImpact).where(ModelImpact.id == impact_id, ModelImpact.status == "activated")
                  .values(status="reported", activated_at=None))


def latest_impact(store: Store, model: str) -> ModelImpact | None:
    """The model's latest report: the activated one, else the latest of any status."""
    with store.session() as s:
        q = sa.select(ModelImpact).where(ModelImpact.model_name == model)
        row = s.scalars(q.where(ModelImpact.status == "activated").order_by(ModelImpact.id.desc())).first()
        return row if row is not None else s.scalars(q.order_by(ModelImpact.id.desc())).first()


def get_impact(store: Store, impact_id: int) -> ModelImpact | None:
    with store.session() as s:
        return s.get(ModelImpact, impact_id)


def due_followups(store: Store, delay_s: float, now: datetime | None = None) -> list[int]:
    """Ids of the activated reports whose follow-up is due: activated at least ``delay_s`` ago and without a
    follow-up computed after that point (one forced earlier with ``--now`` does not count)."""
    from datetime import timedelta

    now = now or utcnow()
    cutoff = now - timedelta(seconds=delay_s)
    with store.session() as s:
        rows = s.execute(sa.select(ModelImpact.id, ModelImpact.activated_at, ModelImpact.followup_at).where(
            ModelImpact.status == "activated", ModelImpact.activated_at.is_not(None),
            ModelImpact.activated_at <= cutoff).order_by(ModelImpact.id)).all()
    return [int(r.id) for r in rows
            if r.followup_at is None or r.followup_at < r.activated_at + timedelta(seconds=delay_s)]


def save_followup(store: Store, impact_id: int, followup: dict[str, Any], at: datetime | None = None) -> None:
    with store.session() as s:
        s.execute(sa.update(ModelImpact).where(ModelImpact.id == impact_id)
                  .values(followup=followup, followup_at=at or utcnow()))


def auto_requests_since(store: Store, since: datetime, until: datetime | None = None) -> list[LoggedGroup]:
    """Every successful ``auto`` request logged in [since, until], with the feedback of the key that made it,
    summed per (routed model, λ, cluster) in the database (a day of a busy gateway's log is not read row by row).
    Feedback rows are unique per request id (migration 0005), and so are the request rows logged since."""
    until = until or utcnow()
    error = sa.case((Feedback.score.is_not(None), 1.0 - Feedback.score), else_=None)
    q = (sa.select(RequestRow.routed_model, RequestRow.lam.label("lam"), RequestRow.cluster,
                   sa.func.count().label("requests"), sa.func.coalesce(sa.func.sum(RequestRow.cost_usd), 0.0)
                   .label("cost_usd"), sa.func.count(RequestRow.cost_usd).label("priced"),
                   sa.func.count(Feedback.score).label("scored"),
                   sa.func.coalesce(sa.func.sum(error), 0.0).label("error_sum"))
         .outerjoin(Feedback, sa.and_(Feedback.request_id == RequestRow.request_id,
                                      sa.or_(RequestRow.key_id == Feedback.key_id,
                                             sa.and_(RequestRow.key_id.is_(None), Feedback.key_id.is_(None)))))
         .where(RequestRow.requested_model == "auto", RequestRow.status_code == 200,
                RequestRow.started_at >= since, RequestRow.started_at <= until)
         .group_by(RequestRow.routed_model, RequestRow.lam, RequestRow.cluster))
    with store.engine.connect() as conn:
        return [LoggedGroup(r.routed_model, None if r.lam is None else float(r.lam),
                            None if r.cluster is None else int(r.cluster), int(r.requests), float(r.cost_usd),
                            int(r.priced), int(r.scored), float(r.error_sum)) for r in conn.execute(q)]
