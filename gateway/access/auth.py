"""API keys: creation, hashing, the request-path authenticator and the admin guard.

A key looks like ``sk-ur-<43 url-safe characters>`` (256 random bits). Only its SHA-256
(``api_keys.key_hash``) and a display prefix (``sk-ur-AbCd``) are stored; the raw key is
printed once by ``uniroute keys create`` and never logged, stored or put in a metric.
Lookups are by hash; the stored and computed hashes are then compared with
``hmac.compare_digest``.

Revocation "at once, on every replica": :class:`KeyAuthenticator` caches a key's policy for
at most ``cache_ttl_s`` (1 s by default), and :class:`gateway.access.budget.SqlBudgetGuard` checks
``revoked_at IS NULL`` in the same atomic UPDATE that reserves budget on every request. So
once ``uniroute keys revoke`` (or ``DELETE /admin/keys/{name}``) commits, the next request
with that key is refused by every replica: requests already past the reservation finish,
no new one starts. Without the SQL budget guard the bound is the cache TTL.

The SQL lives in :mod:`gateway.store.keys`; ``uniroute keys`` is :mod:`gateway.cli.keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.access.budget import period_start_for, store_call
from gateway.config import RouterConfig
from gateway.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from gateway.serving.interfaces import Authenticator, Principal
from gateway.spec import RESERVED_NAMES, model_name_problem
from gateway.store import keys as key_sql
from gateway.store.engine import Store
from gateway.store.tables import BUDGET_PERIODS, BUDGET_POLICIES, ApiKey, utcnow

KEY_PREFIX = "sk-ur-"
DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 4
ADMIN_KEY_ENV = "UNIROUTE_ADMIN_KEY"
METRICS_TOKEN_ENV = "UNIROUTE_METRICS_TOKEN"
#: The λ range keys may have when no config is given: the defaults of router.lambda_min and router.lambda_max.
DEFAULT_LAMBDA_RANGE: tuple[float, float] = (RouterConfig.model_fields["lambda_min"].default,
                                             RouterConfig.model_fields["lambda_max"].default)
#: A key's name: 1-128 ASCII letters, digits and ``. _ @ -`` (the ``api_keys.name`` column; echoed in metric
#: labels, logs and ``/admin/keys/{name}``).
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,128}")
KEY_NAME_RULE = "1-128 characters from ASCII letters, digits and . _ @ -"
#: The largest ``rpm`` a key may have: the ``api_keys.rpm_limit`` column is a 32-bit integer on PostgreSQL.
RPM_MAX = 2**31 - 1
_HOW_TO_GET_A_KEY = "send 'Authorization: Bearer sk-ur-...'; an operator creates keys with `uniroute keys create`"


# ----------------------------------------------------------------------------------- key format
def generate_key() -> str:
    """A new raw key: ``sk-ur-`` + 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw: str) -> str:
    """SHA-256 hex of the raw key: what the database stores and looks up."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def display_prefix(raw: str) -> str:
    return raw[:DISPLAY_PREFIX_LEN]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or a 401 saying what is expected."""
    if not authorization or not authorization.strip():
        raise AuthenticationError(f"missing API key: {_HOW_TO_GET_A_KEY}", code="missing_api_key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key")
    return token


def principal_from_row(row: ApiKey) -> Principal:
    return Principal(
        key_id=row.id,
        key_name=row.name,
        key_prefix=row.key_prefix,
        default_lambda=row.default_lambda,
        lambda_min=row.lambda_min,
        lambda_max=row.lambda_max,
        allowed_models=frozenset(row.allowed_models) if row.allowed_models is not None else None,
        rpm_limit=row.rpm_limit,
        budget_usd=row.budget_usd,
        budget_period=row.budget_period,
        budget_policy=row.budget_policy,
    )


# ------------------------------------------------------------------------------- authenticator
class KeyAuthenticator:
    """:class:`~gateway.serving.interfaces.Authenticator` over ``api_keys`` with a short-lived cache.

    The cache maps key hash → (principal or refusal, fetched at). Entries live at most
    ``cache_ttl_s`` seconds, so a change to a key (λ, budget, revocation) reaches every
    replica within that bound even without the budget guard's per-request check. Unknown
    keys are cached too (same TTL), so guessing keys cannot hammer the database; the cache
    holds at most ``max_entries`` hashes (least recently used evicted).
    """

    def __init__(self, store: Store, *, cache_ttl_s: float = 1.0, max_entries: int = 10_000) -> None:
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, Principal | AuthenticationError]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or now - hit[0] > self.cache_ttl_s:
            result = await store_call(self._lookup, digest)  # a store outage: 503, nothing cached
            hit = (time.monotonic(), result)
            self._cache[digest] = hit
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        self._cache.move_to_end(digest)
        if isinstance(hit[1], AuthenticationError):
            raise AuthenticationError(hit[1].message, code=hit[1].code)
        return hit[1]

    def _lookup(self, digest: str) -> Principal | AuthenticationError:
        row = key_sql.key_by_hash(self.store, digest)
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return AuthenticationError(f"invalid API key: {_HOW_TO_GET_A_KEY}", code="invalid_api_key")
        if row.revoked_at is not None:
            return AuthenticationError(
                f"API key {row.name!r} ({row.key_prefix}...) was revoked at {row.revoked_at:%Y-%m-%dT%H:%M:%SZ}",
                code="revoked_api_key",
            )
        return principal_from_row(row)

    def invalidate(self) -> None:
        """Forget every cached key (this replica); other replicas follow within ``cache_ttl_s``."""
        self._cache.clear()


class AdminGuard:
    """Guards ``/admin/*``: the admin key from ``$UNIROUTE_ADMIN_KEY`` (compared in constant time).

    No key → 401 ``missing_api_key`` saying which header to send; a valid client key → 403
    ``admin_required``; any other key → 401 ``invalid_admin_key``; no admin key configured → 403
    ``admin_disabled`` saying how to enable the admin API.
    """

    def __init__(self, admin_key: str | None = None, authenticator: Authenticator | None = None) -> None:
        self.admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        self.authenticator = authenticator

    async def check(self, authorization: str | None) -> None:
        if not authorization or not authorization.strip():
            raise AuthenticationError(f"missing admin key: send 'Authorization: Bearer <the admin key>' "
                                      f"(${ADMIN_KEY_ENV})", code="missing_api_key")
        token = bearer_token(authorization)
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return
        if not self.admin_key:
            raise PermissionDeniedError(f"the admin API is disabled: set {ADMIN_KEY_ENV} to enable it",
                                        code="admin_disabled")
        client_key = False
        if self.authenticator is not None:
            try:
                await self.authenticator.authenticate(authorization)
                client_key = True
            except AuthenticationError:
                pass
        if client_key:
            raise PermissionDeniedError("this endpoint needs the admin key; client API keys cannot use it",
                                        code="admin_required")
        raise AuthenticationError(f"invalid admin key: the bearer token is not the admin key (${ADMIN_KEY_ENV})",
                                  code="invalid_admin_key")


class MetricsGuard:
    """Guards ``GET /metrics``, which names every key with its spend and budget (``metrics.auth``).

    When required, the caller must send ``Authorization: Bearer <token>`` with the metrics token
    (``$UNIROUTE_METRICS_TOKEN``: read-only, for Prometheus) or the admin key (``$UNIROUTE_ADMIN_KEY``),
    compared in constant time; no database is asked (a scrape stays as cheap as before). Missing or
    wrong → 401; required while neither variable is set → 403 saying how to enable it.
    """

    def __init__(self, required: bool, *, token: str | None = None, admin_key: str | None = None) -> None:
        self.required = required
        token = token if token is not None else os.environ.get(METRICS_TOKEN_ENV) or None
        admin_key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV) or None
        self._secrets = [s.encode() for s in (token, admin_key) if s]

    @property
    def configured(self) -> bool:
        return bool(self._secrets)

    def check(self, authorization: str | None) -> None:
        if not self.required:
            return
        if not self._secrets:
            raise PermissionDeniedError(f"/metrics needs a credential and none is configured: set {METRICS_TOKEN_ENV} "
                                        f"(or {ADMIN_KEY_ENV}) and scrape with 'Authorization: Bearer <it>', or set "
                                        "metrics.auth: none", code="metrics_disabled")
        if not authorization or not authorization.strip():
            raise AuthenticationError(f"/metrics needs 'Authorization: Bearer <token>' with {METRICS_TOKEN_ENV} or "
                                      f"the admin key (metrics.auth)", code="missing_api_key")
        token = bearer_token(authorization).encode()
        ok = False
        for secret in self._secrets:  # compare with every one: no early exit
            ok |= hmac.compare_digest(token, secret)
        if not ok:
            raise AuthenticationError(f"invalid metrics token: send {METRICS_TOKEN_ENV} or the admin key",
                                      code="invalid_api_key")


def metrics_auth_required(setting: str, auth_mode: str) -> bool:
    """Whether ``metrics.auth`` asks for a credential: ``token`` yes, ``none`` no, ``auto`` with ``auth.mode: keys``."""
    if setting not in ("auto", "token", "none"):
        raise ValueError(f"metrics.auth must be 'auto', 'token' or 'none', got {setting!r}")
    return setting == "token" or (setting == "auto" and auth_mode == "keys")


# --------------------------------------------------------------------------------- key admin
def _check_key_params(
    *, name: str, default_lambda: float, lambda_min: float, lambda_max: float, lambda_range: tuple[float, float],
    budget_usd: float | None, period: str, rpm_limit: int | None, models: Sequence[str] | None,
    budget_policy: str = "block",
) -> None:
    if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(f"invalid key name {str(name)[:80]!r}: {KEY_NAME_RULE}", param="name")
    lo, hi = lambda_range
    for label, v in (("lambda", default_lambda), ("lambda_min", lambda_min), ("lambda_max", lambda_max)):
        if not math.isfinite(v) or v < 0:
            raise InvalidRequestError(f"{label} must be a finite number >= 0, got {v}", param=label)
        if not lo <= v <= hi:
            raise InvalidRequestError(f"{label} must lie in [{lo:g}, {hi:g}], the λ range the config allows "
                                      f"(router.lambda_min, router.lambda_max), got {v:g}", param=label)
    if not lambda_min <= default_lambda <= lambda_max:
        raise InvalidRequestError(f"need lambda_min <= lambda <= lambda_max, got {lambda_min} <= {default_lambda} "
                                  f"<= {lambda_max}", param="lambda")
    if budget_usd is not None and (not math.isfinite(budget_usd) or budget_usd < 0):
        raise InvalidRequestError(f"budget must be a number of USD >= 0, got {budget_usd}", param="budget_usd")
    check_budget_policy(budget_policy, budget_usd)
    if period not in BUDGET_PERIODS:
        raise InvalidRequestError(f"unknown budget period {period!r}; valid: {', '.join(BUDGET_PERIODS)}",
                                  param="period")
    if rpm_limit is not None and not 1 <= rpm_limit <= RPM_MAX:
        raise InvalidRequestError(f"rpm must be an integer in [1, {RPM_MAX}] (omit it for no limit), got {rpm_limit}",
                                  param="rpm")
    if models is not None and (not models or any(not m for m in models)):
        raise InvalidRequestError("models must be a non-empty list of model names (omit it for every model)",
                                  param="models")
    for m in models or ():
        problem = model_name_problem(m) if m not in RESERVED_NAMES else None
        if problem is not None:
            raise InvalidRequestError(f"models: {problem}", param="models")


def check_budget_policy(policy: str, budget_usd: float | None) -> None:
    """400 unless ``policy`` is a budget policy, and ``pace`` comes with a budget to pace against."""
    if policy not in BUDGET_POLICIES:
        raise InvalidRequestError(f"unknown budget policy {str(policy)[:40]!r}; valid: {', '.join(BUDGET_POLICIES)}",
                                  param="budget_policy")
    if policy == "pace" and budget_usd is None:
        raise InvalidRequestError("budget_policy 'pace' paces spend against the key's budget: set budget_usd too",
                                  param="budget_policy")


def create_key(
    store: Store,
    name: str,
    *,
    default_lambda: float,
    budget_usd: float | None = None,
    period: str = "month",
    lambda_min: float | None = None,
    lambda_max: float | None = None,
    rpm_limit: int | None = None,
    models: Sequence[str] | None = None,
    lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE,
    trusted: bool = False,
    budget_policy: str = "block",
) -> tuple[str, ApiKey]:
    """Create a key; returns ``(raw key, row)``. The raw key exists only in the return value.

    ``lambda_range`` is the λ range the config allows (``router.lambda_min``, ``router.lambda_max``):
    the key's λ and its own range must lie inside it (400 otherwise), and its range defaults to it.
    ``budget_policy`` is ``block`` (the budget's hard cap) or ``pace`` (λ also paced; needs a budget).
    """
    lam_min = lambda_min if lambda_min is not None else lambda_range[0]
    lam_max = lambda_max if lambda_max is not None else lambda_range[1]
    _check_key_params(name=name, default_lambda=default_lambda, lambda_min=lam_min, lambda_max=lam_max,
                      lambda_range=lambda_range, budget_usd=budget_usd, period=period, rpm_limit=rpm_limit,
                      models=models, budget_policy=budget_policy)
    raw = generate_key()
    now = utcnow()
    row = key_sql.insert_key(
        store, name=name, key_hash=hash_key(raw), key_prefix=display_prefix(raw), default_lambda=default_lambda,
        lambda_min=lam_min, lambda_max=lam_max, budget_usd=budget_usd, budget_period=period,
        period_start=period_start_for(period, now), rpm_limit=rpm_limit, allowed_models=models, created_at=now,
        trusted=trusted, budget_policy=budget_policy,
    )
    return raw, row


def key_summary(row: ApiKey) -> dict[str, Any]:
    """A key as the admin API and ``keys list`` show it (never the hash or the raw key)."""
    def iso(t: datetime | None) -> str | None:
        return t.isoformat().replace("+00:00", "Z") if t is not None else None

    return {
        "name": row.name, "prefix": row.key_prefix, "lambda": row.default_lambda,
        "lambda_min": row.lambda_min, "lambda_max": row.lambda_max, "budget_usd": row.budget_usd,
        "budget_period": row.budget_period, "budget_policy": row.budget_policy, "period_start": iso(row.period_start), "spend_usd": row.spend_usd,
        "reserved_usd": row.reserved_usd, "total_spend_usd": row.total_spend_usd, "rpm": row.rpm_limit,
        "models": row.allowed_models, "trusted": bool(row.trusted), "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }
