"""``POST /v1/feedback``: a quality signal for one request the gateway served.

Body: ``{"request_id": str, "score": float in [0, 1]}`` or ``{"request_id", "thumbs": "up"|"down"}``
(up = 1, down = 0), optional ``"source"`` (default ``"user"``). ``request_id`` is the gateway's own
id of the request (``x-uniroute-request-id``, ``uniroute.request_id``), never the client's
``x-uniroute-client-request-id``. Only the key that made the request may send feedback on it; for
any other key the request does not exist (404). One feedback per request: a second is 409
``feedback_exists`` and the first one stands. In ``auth.mode: open`` anonymous requests take
anonymous feedback. Re-profiling (:mod:`profiling.schedule`) folds the scores into the serving
model's Ψ for the request's cluster, with at most ``profiling.max_key_share`` of a cluster's weight
per key (docs/security/tenants.md).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import InvalidRequestError, NotFoundError, validation_message
from gateway.http.auth import accounting, authenticate
from gateway.http.middleware import REQUEST_ID_PATTERN, REQUEST_ID_RULE
from gateway.http.responses import json_body, json_response
from gateway.store import feedback as feedback_sql

#: A feedback ``source``: 1-32 ASCII letters, digits and ``_ . : -`` (the ``feedback.source`` column).
_SOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    score: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None
    source: str = "user"

    @model_validator(mode="after")
    def _one_signal(self) -> FeedbackRequest:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of 'score' (a number in [0, 1]) or 'thumbs' ('up' or 'down')")
        if not REQUEST_ID_PATTERN.fullmatch(self.request_id):
            raise ValueError(f"'request_id' is {REQUEST_ID_RULE} (the x-uniroute-request-id of a response)")
        if not _SOURCE.fullmatch(self.source):
            raise ValueError("'source' must be 1-32 characters of letters, digits, '_', '.', ':' or '-'")
        return self

    @property
    def value(self) -> float:
        if self.score is not None:
            return float(self.score)
        return 1.0 if self.thumbs == "up" else 0.0


def parse_feedback(data: Any) -> FeedbackRequest:
    """The feedback of a parsed JSON body; 400 naming what is wrong and the fields."""
    try:
        return FeedbackRequest.model_validate(data)
    except ValidationError as exc:
        param = next((str(e["loc"][0]) for e in exc.errors() if e["loc"]), None)
        raise InvalidRequestError(validation_message(exc, "feedback", "request_id, score | thumbs, source"),
                                  param=param) from None


async def feedback_endpoint(request: Request) -> Response:
    acc = accounting(request)
    principal = await authenticate(request)
    body = parse_feedback(await json_body(request))
    owned = await asyncio.to_thread(feedback_sql.request_owned_by, acc.store, body.request_id, principal.key_id)
    if not owned:
        # the request row may not be written yet (the log writer batches): flush, then look again
        await asyncio.sleep(0.05)
        await asyncio.to_thread(acc.writer.flush, 5.0)
        owned = await asyncio.to_thread(feedback_sql.request_owned_by, acc.store, body.request_id, principal.key_id)
    if not owned:
        hint = ""
        if await asyncio.to_thread(feedback_sql.is_client_request_id, acc.store, body.request_id, principal.key_id):
            hint = ("; that is your own x-uniroute-client-request-id: feedback needs the gateway's id of the request, "
                    "its x-uniroute-request-id header (uniroute.request_id in the body)")
        raise NotFoundError(f"no request with id {body.request_id!r}{hint}", param="request_id",
                            code="request_not_found")
    fid = await asyncio.to_thread(feedback_sql.add_feedback, acc.store, body.request_id, principal.key_id,
                                  body.value, body.source)
    return json_response({"object": "feedback", "id": fid, "request_id": body.request_id, "score": body.value,
                          "source": body.source}, 201)
