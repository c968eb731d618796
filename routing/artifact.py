"""The router artifact the gateway loads, and the gateway-facing UniRoute policy.

A :class:`RouterArtifact` holds what is learned once from a training set: the K-means
centroids, the LearnedMap θ, the embedder id, K, the default variant, the
representative validation prompts (ids, text and embeddings) on which new models are
profiled, a hash of the training set and the creation time. Per-model profiles Ψ(h)
are stored apart, in ``profiles.json`` (see :mod:`routing.profiles`), so adding a
model is profiling it on the validation prompts; the router is never refitted.

Layout of an artifact folder::

    artifact.json   metadata, validation prompt ids and texts
    arrays.npz      centroids (K, d), theta (d+1, K), val_embeddings (n_val, d)
    profiles.json   per-model profiles (written by ``router fit`` and by profiling)
    embedder/       the static embedding, when fitted with ``--embedder static`` (see
                    routing.embedder.StaticEmbedder); ``embedder_path`` then is relative
                    ("embedder") and is resolved against the artifact folder on load
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from routing.clusters import Membership
from routing.decision import Decider, expected_errors
from routing.policy import PoolModel, RoutingDecision, rank_by_objective
from routing.profiles import ModelProfile, estimate_profile, load_profiles

if TYPE_CHECKING:
    from routing.estimators import LearnedMap, RoutingTask, UniRouteKMeans

ARTIFACT_FORMAT = 1
#: the profile priors an artifact can record: the peer prior (routing.profiles, evaluation only, not adopted) would
#: need the training models' outcomes on the validation prompts and their Ψ in the artifact, which it does not hold
ARTIFACT_PRIORS = ("flat", "difficulty")
#: validation prompts `router fit` profiles the models on (issue 15: the label-efficiency curve in
#: docs/EVALUATION.md decides it — at 500 labels the headline was 0.0021 Area below its Area at 1,000)
DEFAULT_VAL_SIZE = 1000
ARTIFACT_FILE = "artifact.json"
ARRAYS_FILE = "arrays.npz"
STATIC_EMBEDDER_DIR = "embedder"  # a static embedder copied into the artifact folder by `router fit`
VARIANTS = ("kmeans", "learnedmap")
#: How many pools :class:`UniRoutePolicy` keeps prepared (the registry's, and each restriction or overlay of it in
#: use); more in use than this re-prepare theirs.
PREPARED_POOLS = 256


@dataclass
class RouterArtifact:
    embedder_id: str
    k: int
    centroids: np.ndarray  # (K, d)
    theta: np.ndarray | None  # (d+1, K) LearnedMap parameters; None if not fitted
    val_prompt_ids: list[str]
    val_prompts: list[str]
    val_embeddings: np.ndarray  # (n_val, d)
    training_set_hash: str
    variant: str = "learnedmap"
    prior_strength: float = 2.0
    temperature: float | None = None  # soft K-means temperature (None = hard nearest centroid)
    embedder_path: str | None = None
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    format: int = ARTIFACT_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    #: reference answers of the validation prompts (graders need them to profile a new model);
    #: None for artifacts fitted before they were recorded. Not part of :attr:`version`.
    val_answers: list[str | None] | None = None
    #: per variant, how a model's Ψ is shrunk (issue 15): {"prior": "flat" | "difficulty",
    #: "prior_strength": m}; empty for artifacts fitted before (every variant: flat, ``prior_strength``)
    profile_priors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per variant with the difficulty prior, the clusters' difficulty δ (K,) learned from the fit's models
    difficulty: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """A content hash of the learned state: profiles name the artifact version they belong to."""
        h = hashlib.sha256()
        h.update(self.embedder_id.encode())
        h.update(np.ascontiguousarray(self.centroids, dtype=np.float64).tobytes())
        if self.theta is not None:
            h.update(np.ascontiguousarray(self.theta, dtype=np.float64).tobytes())
        h.update("\0".join(self.val_prompt_ids).encode())
        h.update(self.training_set_hash.encode())
        if self.profile_priors:  # absent from older artifacts, whose versions stay what they were
            h.update(json.dumps(self.profile_priors, sort_keys=True).encode())
            for v in sorted(self.difficulty):
                h.update(np.ascontiguousarray(self.difficulty[v], dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def profile_prior(self, variant: str) -> tuple[float, np.ndarray | None]:
        """(prior strength m, difficulty δ or None for the flat prior) with which ``variant``'s Ψ are estimated."""
        spec = self.profile_priors.get(variant)
        if spec is None:
            return self.prior_strength, None
        return float(spec["prior_strength"]), (self.difficulty[variant] if spec["prior"] == "difficulty" else None)

    def membership_map(self, variant: str | None = None) -> Membership:
        """The map z(x) of ``variant`` (default: the artifact's)."""
        v = variant or self.variant
        if v == "learnedmap":
            if self.theta is None:
                raise ValueError("this artifact has no LearnedMap θ; use variant 'kmeans'")
            return Membership.learned(self.theta)
        if v == "kmeans":
            return Membership.kmeans(self.centroids, self.temperature)
        raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")

    def membership(self, x: np.ndarray, variant: str | None = None) -> np.ndarray:
        """z(x), shape (n, K), for ``variant`` (default: the artifact's)."""
        return self.membership_map(variant)(np.atleast_2d(x))

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"centroids": self.centroids, "val_embeddings": self.val_embeddings}
        if self.theta is not None:
            arrays["theta"] = self.theta
        for v, delta in self.difficulty.items():
            arrays[f"difficulty_{v}"] = delta
        np.savez(d / ARRAYS_FILE, **arrays)  # type: ignore[arg-type]
        embedder_path = self.embedder_path
        if embedder_path is not None and Path(embedder_path).is_absolute():
            # an embedder folder inside the artifact is recorded relative to it (the folder can move)
            inside = Path(embedder_path).resolve()
            if inside.is_relative_to(d.resolve()):
                embedder_path = str(inside.relative_to(d.resolve()))
        meta = {
            "format": self.format, "version": self.version, "embedder_id": self.embedder_id,
            "embedder_path": embedder_path, "k": self.k, "variant": self.variant,
            "prior_strength": self.prior_strength, "temperature": self.temperature,
            "training_set_hash": self.training_set_hash, "created_at": self.created_at,
            "has_theta": self.theta is not None, "extra": self.extra,
            "val_prompt_ids": self.val_prompt_ids, "val_prompts": self.val_prompts,
        }
        if self.profile_priors:
            meta["profile_priors"] = self.profile_priors
        if self.val_answers is not None:
            meta["val_answers"] = self.val_answers
        (d / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RouterArtifact:
        d = Path(directory)
        meta_path = d / ARTIFACT_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no router artifact here (run `uniroute router fit`)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{meta_path}: unsupported artifact format {meta.get('format')!r}; "
                             f"expected {ARTIFACT_FORMAT}")
        embedder_path = meta.get("embedder_path")
        if embedder_path is not None and not Path(embedder_path).is_absolute() and (d / embedder_path).exists():
            embedder_path = str((d / embedder_path).resolve())  # a folder inside the artifact
        with np.load(d / ARRAYS_FILE) as arrays:
            centroids = np.asarray(arrays["centroids"])
            theta = np.asarray(arrays["theta"]) if "theta" in arrays else None
            val_emb = np.asarray(arrays["val_embeddings"])
            difficulty = {name[len("difficulty_"):]: np.asarray(arrays[name]) for name in arrays.files
                          if name.startswith("difficulty_")}
        art = cls(embedder_id=meta["embedder_id"], k=int(meta["k"]), centroids=centroids, theta=theta,
                  val_prompt_ids=list(meta["val_prompt_ids"]), val_prompts=list(meta["val_prompts"]),
                  val_embeddings=val_emb, training_set_hash=meta["training_set_hash"], variant=meta["variant"],
                  prior_strength=float(meta["prior_strength"]), temperature=meta.get("temperature"),
                  embedder_path=embedder_path, created_at=meta["created_at"],
                  extra=dict(meta.get("extra") or {}),
                  val_answers=None if meta.get("val_answers") is None else list(meta["val_answers"]),
                  profile_priors=dict(meta.get("profile_priors") or {}), difficulty=difficulty)
        for v, spec in art.profile_priors.items():
            if spec.get("prior") not in ARTIFACT_PRIORS or (spec["prior"] == "difficulty" and v not in difficulty):
                raise ValueError(f"{meta_path}: variant {v!r} has profile prior {spec!r}; valid priors: "
                                 f"{', '.join(ARTIFACT_PRIORS)} (the difficulty prior needs difficulty_{v} in "
                                 f"{ARRAYS_FILE})")
        if meta.get("version") and meta["version"] != art.version:
            raise ValueError(f"{d}: artifact content does not match its recorded version {meta['version']}")
        return art

    # ---------------------------------------------------------------- profiling
    def profile_model(self, model: str, scores: Mapping[str, float], *, cost: float | None = None,
                      variants: Sequence[str] | None = None, reweight: bool = False) -> list[ModelProfile]:
        """Ψ(model) from its scores on (a subset of) the validation prompts, one per variant.

        ``reweight``: the subset was chosen unevenly across clusters (active allocation): weigh each prompt
        by its cluster's share of all validation prompts over its share of the subset
        (:func:`routing.active.importance_weights`, clusters of the variant's membership)."""
        pos = {pid: i for i, pid in enumerate(self.val_prompt_ids)}
        unknown = [pid for pid in scores if pid not in pos]
        if unknown:
            raise KeyError(f"{len(unknown)} prompt ids are not validation prompts of this artifact, "
                           f"e.g. {unknown[0]!r}")
        if not scores:
            raise ValueError(f"no scores for model {model!r}")
        rows = np.asarray([pos[pid] for pid in scores])
        s = np.asarray(list(scores.values()), dtype=np.float64)
        out = []
        for v in variants or self.available_variants():
            w = self.membership(self.val_embeddings[rows], v)
            m, delta = self.profile_prior(v)
            iw = None
            if reweight:
                from routing.active import hard_clusters, importance_weights, traffic_shares

                shares = traffic_shares(hard_clusters(self.membership(self.val_embeddings, v)), self.k)
                iw = importance_weights(hard_clusters(w), shares)
            out.append(estimate_profile(model, w, s, prior_strength=m, cost=cost, variant=v, difficulty=delta,
                                        row_weights=iw))
        return out

    def available_variants(self) -> list[str]:
        return [v for v in VARIANTS if v != "learnedmap" or self.theta is not None]


class UniRoutePolicy:
    """The gateway's UniRoute policy: r(x) = argmin_h Σ_k z_k(x) Ψ_k(h) + λ·c(h)/max c.

    ``PoolModel.psi`` carries each model's profile for this policy's variant; models
    without a profile are left out of the ranking. ``rank`` is pure numpy, and the same
    code as the evaluation's estimators: z(x) is the artifact's :class:`Membership`, the
    expected errors :func:`routing.decision.expected_errors`, the ranking a
    :class:`routing.decision.Decider` (ties: the cheaper model, then the name).
    """

    needs_embedding = True

    def __init__(self, artifact: RouterArtifact, variant: str | None = None) -> None:
        self.artifact = artifact
        self.variant = variant or artifact.variant
        if self.variant not in artifact.available_variants():
            raise ValueError(f"variant {self.variant!r} not available in this artifact; "
                             f"valid: {', '.join(artifact.available_variants())}")
        self.name = f"uniroute-{self.variant}"
        self._k = artifact.k
        # id(pool) -> (pool, prepared), least recently used first; the pool is kept so its id is not reused
        self._prepared_pools: OrderedDict[int, tuple[Sequence[PoolModel], tuple[list[str], np.ndarray, Decider]]] = (
            OrderedDict())
        self._z = artifact.membership_map(self.variant)

    def membership(self, embedding: np.ndarray) -> np.ndarray:
        """z(x), shape (K,), of one prompt embedding."""
        return self._z(np.asarray(embedding).reshape(-1))

    def _prepared(self, pool: Sequence[PoolModel]) -> tuple[list[str], np.ndarray, Decider]:
        """Names, stacked Ψ (m, K) and the :class:`Decider` (normalised costs, tie order) of the pool's
        profiled models. Cached by the pool tuple's identity for the :data:`PREPARED_POOLS` pools used last:
        the gateway passes the same registry tuple until the registry changes, and the same tuple for a key's
        ``allowed_models`` restriction or tenant overlay of it, so those are prepared once each too."""
        cache = self._prepared_pools
        hit = cache.get(id(pool))
        if hit is not None and hit[0] is pool:
            with contextlib.suppress(KeyError):  # another thread may have just dropped it
                cache.move_to_end(id(pool))
            return hit[1]
        eligible = [m for m in pool if m.psi is not None]
        if not eligible:
            listed = ", ".join(m.name for m in pool) or "none"
            raise ValueError(f"no profiled model in the pool ({listed}); profile a model before routing 'auto'")
        for m in eligible:
            assert m.psi is not None
            if len(m.psi) != self._k:
                raise ValueError(f"profile of {m.name!r} has {len(m.psi)} clusters, the router has {self._k}; "
                                 "re-profile it against this artifact")
        psi = np.stack([np.asarray(m.psi, dtype=np.float64) for m in eligible])
        names = [m.name for m in eligible]
        prepared = (names, psi, Decider([m.cost for m in eligible], names))
        if isinstance(pool, tuple):  # immutable: safe to remember by identity
            cache[id(pool)] = (pool, prepared)
            with contextlib.suppress(KeyError):
                cache.move_to_end(id(pool))
                while len(cache) > PREPARED_POOLS:
                    cache.popitem(last=False)
        return prepared

    def rank(self, embedding: np.ndarray | None, pool: Sequence[PoolModel], lam: float) -> RoutingDecision:
        if embedding is None:
            raise ValueError(f"{self.name} needs the prompt's embedding")
        names, psi, decider = self._prepared(pool)
        z = self.membership(embedding)
        return rank_by_objective(names, expected_errors(z, psi), decider.costs, lam, int(np.argmax(z)), decider)


def pool_from_profiles(profiles: Mapping[str, ModelProfile], costs: Mapping[str, float] | None = None
                       ) -> list[PoolModel]:
    """PoolModels from profiles; the cost comes from ``costs`` or else the profile's recorded cost."""
    out = []
    for name, prof in profiles.items():
        cost = (costs or {}).get(name, prof.cost)
        if cost is None:
            raise ValueError(f"no cost for model {name!r}; pass costs or record one in its profile")
        out.append(PoolModel(name=name, cost=float(cost), psi=prof.psi))
    return out


def load_policy(artifact_dir: str | os.PathLike[str], variant: str | None = None) -> UniRoutePolicy:
    """The gateway's entry point: load an artifact folder and build its policy."""
    return UniRoutePolicy(RouterArtifact.load(artifact_dir), variant)


# --------------------------------------------------------------------------- deployment fit

def deployment_task(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], *,
                    val_size: int = DEFAULT_VAL_SIZE, seed: int = 0) -> tuple[RoutingTask, np.ndarray, np.ndarray]:
    """The deployment fit's task: ``val_size`` random prompts profile the models, the rest train the
    clusters and θ. Returns (task, training prompt indices, validation prompt indices)."""
    from routing.estimators import RoutingTask

    n = len(x)
    if not 0 < val_size < n:
        raise ValueError(f"--val-size must be in 1..{n - 1}, got {val_size}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    va, tr = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    task = RoutingTask(x_train=x[tr], train_scores=scores[tr], train_costs=costs, x_val=x[va],
                       val_train_scores=scores[va], val_scores=scores[va], pool_costs=costs,
                       pool_names=list(models), seed=seed)
    return task, tr, va


def fit_estimators(task: RoutingTask, *, k: int | str = "auto", prior_strength: float | str = "auto",
                   prior: str | None = None) -> tuple[UniRouteKMeans, LearnedMap]:
    """The router's two variants, fitted as the evaluation fits them: LearnedMap (K, and m when
    ``"auto"``, chosen by its selection at the validation noise level) and hard K-means on the same
    clusters (its own m when ``"auto"``). ``prior``: the profile prior (default: the estimators')."""
    from routing.estimators import DEFAULT_PRIOR, LearnedMap, UniRouteKMeans

    prior = prior or DEFAULT_PRIOR
    if prior not in ARTIFACT_PRIORS:
        raise ValueError(f"a router artifact records the profile prior {' or '.join(ARTIFACT_PRIORS)}, not {prior!r} "
                         "(the peer prior is evaluation-only: docs/EVALUATION.md)")
    lm = LearnedMap(n_clusters=k if k == "auto" else int(k), prior_strength=prior_strength, prior=prior).fit(task)
    km = UniRouteKMeans(n_clusters=lm.k_, prior_strength=prior_strength, prior=prior).fit(task)
    return km, lm


def fit_artifact(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str],
                 prompt_ids: Sequence[str], prompts: Sequence[str], *, embedder_id: str,
                 training_set_hash: str, k: int | str = "auto", variant: str = "learnedmap",
                 val_size: int = DEFAULT_VAL_SIZE, seed: int = 0, prior_strength: float | str = "auto",
                 prior: str | None = None, embedder_path: str | None = None,
                 answers: Sequence[str | None] | None = None) -> tuple[RouterArtifact, list[ModelProfile]]:
    """Deployment fit: most prompts train the clusters and θ, ``val_size`` prompts profile the models.

    The artifact holds the fitted estimators' centroids and θ, and the profiles are the
    estimators' Ψ: the gateway serves exactly what the evaluation's estimators decide.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    task, tr, va = deployment_task(x, scores, costs, models, val_size=val_size, seed=seed)
    km, lm = fit_estimators(task, k=k, prior_strength=prior_strength, prior=prior)
    fitted = {"kmeans": (km.psi_, km.counts_), "learnedmap": (lm.psi_, lm.counts_)}
    k_fit = km.k_
    assert isinstance(k_fit, int)
    used = {"kmeans": (km.prior, km.prior_strength_, km.difficulty_),
            "learnedmap": (lm.prior, lm.prior_strength_, lm.difficulty_)}
    art = RouterArtifact(embedder_id=embedder_id, k=k_fit, centroids=km.centroids_, theta=lm.theta_,
                         val_prompt_ids=[prompt_ids[i] for i in va], val_prompts=[prompts[i] for i in va],
                         val_embeddings=x[va].astype(np.float32), training_set_hash=training_set_hash,
                         variant=variant, prior_strength=float(used[variant][1]), embedder_path=embedder_path,
                         extra={"n_train": len(tr), "k_selection": "auto" if k == "auto" else "given",
                                "seed": seed},
                         val_answers=None if answers is None else [answers[i] for i in va],
                         profile_priors={v: {"prior": p, "prior_strength": float(m)} for v, (p, m, _) in used.items()},
                         difficulty={v: np.asarray(d) for v, (_, _, d) in used.items() if d is not None})
    val_scores = np.asarray(task.val_scores, dtype=np.float64)
    profiles: list[ModelProfile] = []
    for j, name in enumerate(models):
        for v in art.available_variants():
            psi, counts = fitted[v]
            profiles.append(ModelProfile(model=name, psi=np.asarray(psi[j]), counts=counts,
                                         overall_error=float(1.0 - val_scores[:, j].mean()), n_prompts=len(va),
                                         prior_strength=float(used[v][1]), cost=float(costs[j]), variant=v))
    return art, profiles



def load_pool(artifact_dir: str | os.PathLike[str], variant: str,
              models: Sequence[str] | None = None) -> list[PoolModel]:
    """The profiled pool recorded next to an artifact (costs from the profiles)."""
    profiles = load_profiles(artifact_dir, variant)
    if models:
        missing = [m for m in models if m not in profiles]
        if missing:
            raise KeyError(f"no profile for {', '.join(missing)}; profiled: {', '.join(profiles)}")
        profiles = {m: profiles[m] for m in models}
    return pool_from_profiles(profiles)
