"""A paced key near the end of its budget is served by a cheaper model, not refused (issue 13 point 1;
docs/PACING.md "Near the end of the budget").

The chat service runs in process with the real budget guard on a real database (SQLite and PostgreSQL) over
``BillingUpstream`` (tests/test_budget_cap.py: an in-memory provider that bills known tokens). The ranking
puts the dearest model first (it has the lowest expected error); no request sends ``max_tokens``, so each
model's reservation is its prompt plus ``budget.default_max_output_tokens`` at its price. With less left than
the dear and the middle model's reservation, a ``pace`` key is served by the cheap model and a ``block`` key
gets the 429; with less left than even the cheap model's, both get the 429 (the hard cap holds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard, period_starts
from gateway.errors import BudgetExceededError
from gateway.protocol import parse_chat_request
from gateway.serving.forwarding import Forwarder
from gateway.serving.interfaces import MemorySink, OpenAuthenticator, Principal
from gateway.serving.registry import Registry
from gateway.serving.service import ChatContext, ChatService
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, ReservationRow, utcnow
from routing.policy import PoolModel, RoutingDecision, normalised_costs, rank_by_objective
from tests.storeutil import store_fixture
from tests.test_budget_cap import BillingUpstream, billing_config

MODELS: list[dict[str, Any]] = [  # per 1M tokens; no max_output_tokens: the default output bound (4096) applies
    {"name": "dear", "router_cost": 5.0, "input_cost_per_1m": 5.0, "output_cost_per_1m": 20.0},
    {"name": "mid", "router_cost": 2.0, "input_cost_per_1m": 1.0, "output_cost_per_1m": 4.0},
    {"name": "cheap", "router_cost": 1.0, "input_cost_per_1m": 0.1, "output_cost_per_1m": 0.4},
]
ERRORS = {"dear": 0.1, "mid": 0.2, "cheap": 0.3}  # the dear model ranks first at λ = 0


class QualityFirst:
    """A prompt-agnostic policy with fixed expected errors: at λ = 0 it ranks dear, mid, cheap."""

    name = "quality-first"
    needs_embedding = False

    def rank(self, embedding: np.ndarray | None, pool: Sequence[PoolModel], lam: float) -> RoutingDecision:
        errors = np.array([ERRORS[m.name] for m in pool])
        return rank_by_objective([m.name for m in pool], errors, normalised_costs(pool), lam, None)


store = store_fixture()


def _service(store: Store, policy: str, left_usd: float) -> tuple[ChatService, BillingUpstream, MemorySink, Principal]:
    """A key of ``policy`` with a $1 monthly budget of which only ``left_usd`` is left."""
    cfg = billing_config(MODELS)
    registry = Registry.from_config(cfg)
    upstream = BillingUpstream()
    fw = Forwarder(max_attempts=2, upstream=upstream)
    registry.on_replace(fw.register)
    _raw, row = create_key(store, f"k-{policy}", default_lambda=0.0, budget_usd=1.0, budget_policy=policy)
    with store.sessions() as s, s.begin():
        s.execute(sa.update(ApiKey).where(ApiKey.id == row.id).values(
            spend_usd=1.0 - left_usd, period_start=period_starts(utcnow()).month))
    principal = principal_from_row(row)
    sink = MemorySink()
    service = ChatService(registry, QualityFirst(), fw, authenticator=OpenAuthenticator(principal),
                          budget=SqlBudgetGuard(store), sink=sink)
    return service, upstream, sink, principal


def _body(rid: str, model: str = "auto") -> dict[str, Any]:
    how = {"rid": rid, "wanted": 50, "lie": None, "usage": True}
    return {"model": model, "messages": [{"role": "system", "content": json.dumps(how)},
                                         {"role": "user", "content": "summarise the budget rules"}]}


def _spend(store: Store, key_id: int | None) -> tuple[float, float]:
    with store.sessions() as s:
        key = s.get(ApiKey, key_id)
        held = s.scalars(sa.select(ReservationRow).where(ReservationRow.released_at.is_(None))).all()
    assert key is not None and not held  # no reservation stays held
    return key.spend_usd, key.reserved_usd


async def test_a_paced_key_near_its_budgets_end_is_served_by_a_cheaper_model(store: Store) -> None:
    service, upstream, sink, principal = _service(store, "pace", left_usd=0.005)  # < mid's ~$0.0164, > cheap's
    # the dear model would be tried first, with the middle one as its fallback: neither reservation fits
    result = await service.complete(parse_chat_request(_body("p1")), ChatContext(request_id="p1"))
    ext = result.body["uniroute"]
    assert ext["model"] == "cheap" and ext["budget_degraded"] is True
    assert ext["candidates"][0]["model"] == "dear"  # the ranking is unchanged: only what fits was tried
    assert [a["model"] for a in ext["attempts"]] == ["cheap"]
    assert upstream.billed["p1"].model == "cheap"
    spend, reserved = _spend(store, principal.key_id)
    assert reserved == pytest.approx(0.0, abs=1e-12)  # settled: the reservation was released
    assert 1.0 - 0.005 < spend <= 1.0 + 1e-9  # charged, and the hard cap holds
    assert sink.records[-1].budget_degraded and sink.records[-1].status_code == 200

    # a stream degrades the same way
    stream = await service.stream(parse_chat_request({**_body("p2"), "stream": True}), ChatContext(request_id="p2"))
    try:
        async for _chunk in stream.chunks:
            pass
    finally:
        await stream.aclose()
    assert upstream.billed["p2"].model == "cheap" and sink.records[-1].budget_degraded


async def test_a_block_key_gets_the_429_where_a_paced_key_degrades(store: Store) -> None:
    service, upstream, _sink, principal = _service(store, "block", left_usd=0.005)
    with pytest.raises(BudgetExceededError) as err:
        await service.complete(parse_chat_request(_body("b1")), ChatContext(request_id="b1"))
    assert err.value.status_code == 429 and "on model 'dear'" in err.value.message
    assert err.value.remaining_usd == pytest.approx(0.005)
    assert "b1" not in upstream.billed
    assert _spend(store, principal.key_id)[0] == pytest.approx(1.0 - 0.005)


@pytest.mark.parametrize("case", ["nothing fits", "named model"])
async def test_the_hard_cap_still_holds_for_a_paced_key(store: Store, case: str) -> None:
    left = 0.0001 if case == "nothing fits" else 0.005  # below even the cheap model's ~$0.0016 reservation
    service, upstream, _sink, principal = _service(store, "pace", left_usd=left)
    model = "auto" if case == "nothing fits" else "dear"  # a named model is what the client asked for: no swap
    with pytest.raises(BudgetExceededError) as err:
        await service.complete(parse_chat_request(_body("n1", model)), ChatContext(request_id="n1"))
    assert err.value.status_code == 429 and "n1" not in upstream.billed
    assert _spend(store, principal.key_id) == (pytest.approx(1.0 - left), pytest.approx(0.0, abs=1e-12))


def test_each_candidate_is_priced_alone() -> None:
    from gateway.serving.estimate import Estimator

    cfg = billing_config(MODELS)
    entries = [e for e in (Registry.from_config(cfg).get(m["name"]) for m in MODELS) if e is not None]
    req = parse_chat_request(_body("e1"))
    est = Estimator()
    each = est.each(req, entries)
    assert each == pytest.approx([est.estimate(req, [e]).usd for e in entries])
    assert max(each) == pytest.approx(est.estimate(req, entries).usd)
    assert each[0] > each[1] > each[2] > 0
    assert est.each(req, []) == []
