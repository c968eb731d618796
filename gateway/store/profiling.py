"""Profiling's SQL: validation outcomes, the validation prior, feedback per served request, re-profiling runs.

:mod:`profiling` (the profiler and the re-profiling pass) reads and writes the gateway's tables
only through these functions; the lease it takes is :mod:`gateway.store.lease`, and the
profile versions it stores are :func:`gateway.store.models.save_profile`.

- ``profile_outcomes``: one row per (model, artifact version, validation prompt), replaced when
  the prompt is asked again; a row with a score is never asked again (profiling resumes).
- the *prior* of a re-profiling pass: the model's latest profile measured on validation prompts
  (:data:`PRIOR_SOURCES`).
- feedback per (model, cluster): every feedback row on a successful request the model served,
  sent by the key that made the request (with ``trusted_only``, a key marked trusted), counted
  once even where old rows share a request id.
- ``reprofile_runs``: one row per pass, with its report (``GET /admin/reprofile/last``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gateway.store.engine import Store
from gateway.store.tables import (
    ApiKey,
    Feedback,
    KeyPacing,
    ProfileOutcome,
    ProfileRow,
    ReprofileRun,
    RequestRow,
    utcnow,
)

#: profile sources measured on the validation prompts: the prior of a re-profiling pass
PRIOR_SOURCES = ("validation", "validation-partial", "import")


# ------------------------------------------------------------------------- profile outcomes
def graded_prompt_ids(store: Store, router_version: str, model: str) -> set[str]:
    """Prompt ids with a graded outcome (a score) for ``model`` on artifact ``router_version``."""
    with store.session() as s:
        return set(s.scalars(sa.select(ProfileOutcome.prompt_id).where(
            ProfileOutcome.model_name == model, ProfileOutcome.router_version == router_version,
            ProfileOutcome.score.is_not(None))))


def record_outcome(store: Store, router_version: str, *, model: str, prompt_id: str, cluster: int,
                   score: float | None, answer: str | None, cost_usd: float | None, error: str | None) -> None:
    """Store one outcome, replacing an earlier one for the same model and prompt.

    Two Core statements in one transaction, no ORM session: profiling calls this once per answer (a thousand
    times for the demo's validation set), and the session's unit of work cost twice the statements' CPU."""
    with store.engine.begin() as conn:
        conn.execute(sa.delete(ProfileOutcome).where(
            ProfileOutcome.model_name == model, ProfileOutcome.router_version == router_version,
            ProfileOutcome.prompt_id == prompt_id))
        conn.execute(sa.insert(ProfileOutcome).values(
            model_name=model, router_version=router_version, prompt_id=prompt_id, cluster=cluster, score=score,
            answer=(answer or None) and answer[:4000], cost_usd=cost_usd, error=error and error[:250]))


def outcome_rows(store: Store, router_version: str, model: str) -> list[ProfileOutcome]:
    with store.session() as s:
        return list(s.scalars(sa.select(ProfileOutcome).where(
            ProfileOutcome.model_name == model, ProfileOutcome.router_version == router_version)))


def delete_outcomes(store: Store, router_version: str, model: str) -> int:
    """Forget ``model``'s outcomes on artifact ``router_version`` (``uniroute profile --restart``)."""
    with store.session() as s:
        res = s.execute(sa.delete(ProfileOutcome).where(
            ProfileOutcome.model_name == model, ProfileOutcome.router_version == router_version))
        return int(getattr(res, "rowcount", 0) or 0)


# ------------------------------------------------------------------------------ re-profiling
def latest_prior(store: Store, model: str, key: str) -> ProfileRow | None:
    """``model``'s latest profile for router ``key`` measured on validation prompts (any of PRIOR_SOURCES)."""
    with store.session() as s:
        return s.scalars(sa.select(ProfileRow).where(
            ProfileRow.model_name == model, ProfileRow.router_version == key,
            ProfileRow.source.in_(PRIOR_SOURCES)).order_by(ProfileRow.version.desc())).first()


def feedback_by_model(store: Store, k: int, *, trusted_only: bool = False
                      ) -> dict[str, list[tuple[int, float, int | None]]]:
    """``{model: [(cluster, score, key id), ...]}``: feedback on successful requests the model served in
    a cluster ``0 <= cluster < k``, counted only when sent by the key that made the request, and with
    ``trusted_only`` only from keys marked trusted (never anonymous feedback).

    Each feedback row counts once: rows logged before migration 0005 may share a client-chosen
    request id, and a feedback row then joins the first of them only."""
    out: dict[str, list[tuple[int, float, int | None]]] = {}
    seen: set[int] = set()
    with store.session() as s:
        q = (sa.select(Feedback.id, RequestRow.routed_model, RequestRow.cluster, Feedback.score, Feedback.key_id)
             .join(RequestRow, RequestRow.request_id == Feedback.request_id)
             .where(RequestRow.routed_model.is_not(None), RequestRow.cluster.is_not(None),
                    RequestRow.status_code == 200,
                    sa.or_(RequestRow.key_id == Feedback.key_id,
                           sa.and_(RequestRow.key_id.is_(None), Feedback.key_id.is_(None))))
             .order_by(Feedback.id, RequestRow.started_at, RequestRow.id))
        if trusted_only:
            q = q.join(ApiKey, ApiKey.id == Feedback.key_id).where(ApiKey.trusted.is_(True))
        for fid, model, cluster, score, key_id in s.execute(q):
            if fid in seen:
                continue
            seen.add(fid)
            if cluster is not None and 0 <= int(cluster) < k:
                out.setdefault(str(model), []).append((int(cluster), float(score), key_id))
    return out


def save_reprofile_run(store: Store, *, holder: str, key: str, started_at: datetime, report: dict[str, Any]) -> None:
    with store.session() as s:
        s.add(ReprofileRun(holder=holder, router_version=key, started_at=started_at, finished_at=utcnow(),
                           report=report))


def last_reprofile_run(store: Store) -> dict[str, Any] | None:
    """The last pass's report with who ran it and when (any router key); None before the first pass."""
    with store.session() as s:
        row = s.scalars(sa.select(ReprofileRun).order_by(ReprofileRun.id.desc())).first()
        if row is None:
            return None
        return {"id": row.id, "holder": row.holder, "router": row.router_version,
                "started_at": row.started_at.isoformat(),
                "finished_at": row.finished_at.isoformat() if row.finished_at else None, **row.report}


def last_cluster_drift(store: Store, key: str) -> list[dict[str, Any]]:
    """The per-cluster drift rows of the last pass for router ``key`` (``[]`` before the first, or when that
    pass measured none): what the ``uniroute_profile_drift`` gauges export."""
    with store.session() as s:
        report = s.scalar(sa.select(ReprofileRun.report).where(ReprofileRun.router_version == key)
                          .order_by(ReprofileRun.id.desc()).limit(1))
    rows = (report or {}).get("cluster_drift") or []
    return [dict(r) for r in rows if isinstance(r, dict)]


def seconds_since_last_reprofile(store: Store, key: str) -> float | None:
    """Seconds since the last pass for router ``key`` finished (any holder); None before the first."""
    with store.session() as s:
        last = s.scalar(sa.select(sa.func.max(ReprofileRun.finished_at)).where(ReprofileRun.router_version == key))
    return None if last is None else (utcnow() - last).total_seconds()


def recent_auto_clusters(store: Store, since: datetime) -> list[int]:
    """The most likely cluster of every successful ``auto`` request logged since ``since`` (the impact report's
    traffic mix, docs/IMPACT.md)."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(RequestRow.cluster).where(
            RequestRow.requested_model == "auto", RequestRow.started_at >= since, RequestRow.status_code == 200,
            RequestRow.cluster.is_not(None)))
        return [int(r[0]) for r in rows if r[0] is not None]


def key_lambdas(store: Store) -> list[tuple[str, float, str]]:
    """(name, λ, which) of every active key (the impact report's per-key rows): its default λ (``default``), or
    for a ``budget_policy: pace`` key the λ its pacer last stored in ``key_pacing`` (``paced``; its default λ,
    ``paced-unstarted``, while it has none), within the key's λ range."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(ApiKey.name, ApiKey.default_lambda, ApiKey.budget_policy, ApiKey.lambda_min,
                                      ApiKey.lambda_max, KeyPacing.lam)
                            .outerjoin(KeyPacing, KeyPacing.key_id == ApiKey.id)
                            .where(ApiKey.revoked_at.is_(None)).order_by(ApiKey.name))
        out: list[tuple[str, float, str]] = []
        for r in rows:
            paced = r.budget_policy == "pace"
            which = ("paced" if r.lam is not None else "paced-unstarted") if paced else "default"
            lam = float(r.lam) if which == "paced" else float(r.default_lambda)
            out.append((str(r.name), min(max(lam, float(r.lambda_min)), float(r.lambda_max)), which))
        return out
