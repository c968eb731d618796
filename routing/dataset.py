"""Reader for the *routing benchmark format* (see ``docs/DATA.md``).

A dataset is one folder holding ``prompts.jsonl.gz``, ``outcomes.csv.gz``,
``models.csv`` and ``DATASET.md``.  :func:`load_dataset` reads any such folder
into a :class:`BenchmarkDataset` (dense score matrix, prompts in file order,
models in ``models.csv`` order) and refuses a folder that breaks the format's
rules with a :class:`DatasetError` naming the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Environment variable naming the default dataset folder.
DATASET_ENV = "UNIROUTE_DATASET"

PROMPTS_FILE = "prompts.jsonl.gz"
OUTCOMES_FILE = "outcomes.csv.gz"
MODELS_FILE = "models.csv"
OUTCOMES_HEADER = ["prompt_id", "model", "score", "cost", "response"]
MODELS_HEADER = ["model", "cost", "notes"]


class DatasetError(ValueError):
    """A folder that is not valid routing benchmark format; the message names file and line."""


@dataclass(frozen=True)
class BenchmarkDataset:
    """One routing benchmark, held densely.

    ``scores[i, j]`` is the score of ``models[j]`` on ``prompt_ids[i]``.
    ``query_costs[i, j]`` is the recorded per-query cost (NaN where the file left it empty).
    ``responses[i][j]`` is the recorded short answer ('' where empty).
    """

    path: Path
    prompt_ids: list[str]
    prompts: list[str]
    categories: list[str | None]
    answers: list[str | None]
    models: list[str]
    model_costs: np.ndarray  # shape (n_models,), > 0
    model_notes: list[str]
    scores: np.ndarray  # shape (n_prompts, n_models), in [0, 1]
    query_costs: np.ndarray  # shape (n_prompts, n_models), NaN when unknown
    responses: list[list[str]]
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_models(self) -> int:
        return len(self.models)

    def prompt_index(self, prompt_id: str) -> int:
        return self._index[prompt_id]

    def model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(f"unknown model {model!r}; known: {', '.join(self.models)}") from None

    def fingerprint(self) -> str:
        """A stable hash of prompts, models, costs and scores (identifies the training data)."""
        h = hashlib.sha256()
        for pid, text in zip(self.prompt_ids, self.prompts, strict=True):
            h.update(pid.encode())
            h.update(b"\0")
            h.update(text.encode())
            h.update(b"\1")
        for m in self.models:
            h.update(m.encode())
            h.update(b"\2")
        h.update(np.ascontiguousarray(self.model_costs, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.scores, dtype=np.float64).tobytes())
        return h.hexdigest()


#: The routing benchmark shipped with the repository (``data/mmlu_pro_27``, see its DATASET.md).
REPO_DATASET = Path(__file__).resolve().parent.parent / "data" / "mmlu_pro_27"


def default_dataset_path() -> Path | None:
    """The folder named by ``$UNIROUTE_DATASET``, else the repository's ``data/mmlu_pro_27``.

    None when neither is set or present (e.g. an installed wheel, which does not carry ``data/``).
    """
    env = os.environ.get(DATASET_ENV)
    if env:
        return Path(env)
    return REPO_DATASET if (REPO_DATASET / MODELS_FILE).is_file() else None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; a routing benchmark folder needs {PROMPTS_FILE}, "
                           f"{OUTCOMES_FILE} and {MODELS_FILE}")
    return path


def _read_models(path: Path) -> tuple[list[str], list[float], list[str]]:
    names: list[str] = []
    costs: list[float] = []
    notes: list[str] = []
    with _open_text(_require(path)) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != MODELS_HEADER[:2]:
            raise DatasetError(f"{path}:1: header must be {','.join(MODELS_HEADER)}, got {header}")
        seen: set[str] = set()
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            name = row[0].strip()
            if not name:
                raise DatasetError(f"{path}:{line}: empty model name")
            if name in seen:
                raise DatasetError(f"{path}:{line}: model {name!r} listed twice")
            try:
                cost = float(row[1])
            except (IndexError, ValueError):
                raise DatasetError(f"{path}:{line}: cost of {name!r} is not a number") from None
            if not math.isfinite(cost) or cost <= 0:
                raise DatasetError(f"{path}:{line}: cost of {name!r} must be > 0, got {row[1]!r}")
            seen.add(name)
            names.append(name)
            costs.append(cost)
            notes.append(row[2] if len(row) > 2 else "")
    if not names:
        raise DatasetError(f"{path}: no models")
    return names, costs, notes


def _iter_prompts(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with _open_text(_require(path)) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def load_dataset(path: str | os.PathLike[str], *, with_responses: bool = True) -> BenchmarkDataset:
    """Read and validate one routing benchmark folder."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    models, costs, notes = _read_models(root / MODELS_FILE)
    model_pos = {m: j for j, m in enumerate(models)}

    prompts_path = root / PROMPTS_FILE
    ids: list[str] = []
    texts: list[str] = []
    cats: list[str | None] = []
    answers: list[str | None] = []
    index: dict[str, int] = {}
    for line_no, obj in _iter_prompts(prompts_path):
        pid, text = obj.get("id"), obj.get("prompt")
        if not isinstance(pid, str) or not pid:
            raise DatasetError(f"{prompts_path}:{line_no}: 'id' must be a non-empty string")
        if not isinstance(text, str):
            raise DatasetError(f"{prompts_path}:{line_no}: 'prompt' must be a string")
        if pid in index:
            raise DatasetError(f"{prompts_path}:{line_no}: duplicate prompt id {pid!r}")
        cat, ans = obj.get("category"), obj.get("answer")
        if cat is not None and not isinstance(cat, str):
            raise DatasetError(f"{prompts_path}:{line_no}: 'category' must be a string or null")
        if ans is not None and not isinstance(ans, str):
            raise DatasetError(f"{prompts_path}:{line_no}: 'answer' must be a string or null")
        index[pid] = len(ids)
        ids.append(pid)
        texts.append(text)
        cats.append(cat)
        answers.append(ans)
    if not ids:
        raise DatasetError(f"{prompts_path}: no prompts")

    n, m = len(ids), len(models)
    # filled as flat Python lists (row i * m + j) and made arrays at the end: a numpy element read or write
    # per outcome row costs several times a list's (the benchmark has ~280k rows; every replay loads it)
    flat_scores = [math.nan] * (n * m)
    flat_costs = [math.nan] * (n * m)
    responses: list[list[str]] = [[""] * m for _ in range(n)] if with_responses else []
    outcomes_path = root / OUTCOMES_FILE
    with _open_text(_require(outcomes_path)) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != OUTCOMES_HEADER:
            raise DatasetError(f"{outcomes_path}:1: header must be {','.join(OUTCOMES_HEADER)}, got {header}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 5:
                raise DatasetError(f"{outcomes_path}:{line}: expected 5 fields, got {len(row)}")
            pid, model, score_s, cost_s, response = row
            i = index.get(pid)
            if i is None:
                raise DatasetError(f"{outcomes_path}:{line}: unknown prompt_id {pid!r}")
            j = model_pos.get(model)
            if j is None:
                raise DatasetError(f"{outcomes_path}:{line}: unknown model {model!r}; known: {', '.join(models)}")
            try:
                score = float(score_s)
            except ValueError:
                raise DatasetError(f"{outcomes_path}:{line}: score {score_s!r} is not a number") from None
            if not math.isfinite(score) or not 0.0 <= score <= 1.0:
                raise DatasetError(f"{outcomes_path}:{line}: score must be finite and in [0,1], got {score_s!r}")
            cell = i * m + j
            if not math.isnan(flat_scores[cell]):
                raise DatasetError(f"{outcomes_path}:{line}: duplicate outcome for ({pid!r}, {model!r})")
            flat_scores[cell] = score
            if cost_s.strip():
                try:
                    flat_costs[cell] = float(cost_s)
                except ValueError:
                    raise DatasetError(f"{outcomes_path}:{line}: cost {cost_s!r} is not a number") from None
            if with_responses:
                responses[i][j] = response
    scores = np.array(flat_scores, dtype=np.float64).reshape(n, m)
    qcost = np.array(flat_costs, dtype=np.float64).reshape(n, m)
    missing = np.argwhere(np.isnan(scores))
    if missing.size:
        i, j = missing[0]
        raise DatasetError(
            f"{outcomes_path}: {len(missing)} (prompt, model) outcomes missing, "
            f"e.g. prompt {ids[i]!r} (line {line_of(prompts_path, int(i))} of {PROMPTS_FILE}) × model {models[j]!r}"
        )
    return BenchmarkDataset(
        path=root,
        prompt_ids=ids,
        prompts=texts,
        categories=cats,
        answers=answers,
        models=models,
        model_costs=np.asarray(costs, dtype=np.float64),
        model_notes=notes,
        scores=scores,
        query_costs=qcost,
        responses=responses,
        _index=index,
    )


def line_of(prompts_path: Path, position: int) -> int:
    """The 1-based line of the ``position``-th prompt record (blank lines skipped)."""
    for k, (line_no, _) in enumerate(_iter_prompts(prompts_path)):
        if k == position:
            return line_no
    return -1


#: the compression level of the ``.gz`` files :func:`write_dataset` writes
GZIP_LEVEL = 6


def write_dataset(
    path: str | os.PathLike[str],
    *,
    prompt_ids: Sequence[str],
    prompts: Sequence[str],
    models: Sequence[str],
    model_costs: Sequence[float],
    scores: np.ndarray,
    responses: Sequence[Sequence[str]] | None = None,
    categories: Sequence[str | None] | None = None,
    answers: Sequence[str | None] | None = None,
    description: str = "Generated dataset.",
) -> Path:
    """Write a folder in routing benchmark format (used by tests, demos and benchmarks)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    # gzip level 6 (zlib's default; gzip.open's 9 takes several times the CPU for a slightly smaller file), and
    # the text handed to the gzip file a model's column at a time, not a line at a time (a Python call each)
    with gzip.open(root / PROMPTS_FILE, "wt", encoding="utf-8", compresslevel=GZIP_LEVEL) as fh:
        fh.write("".join(json.dumps({
            "id": pid,
            "prompt": text,
            "category": categories[k] if categories else None,
            "answer": answers[k] if answers else None,
        }) + "\n" for k, (pid, text) in enumerate(zip(prompt_ids, prompts, strict=True))))
    with gzip.open(root / OUTCOMES_FILE, "wt", encoding="utf-8", newline="", compresslevel=GZIP_LEVEL) as fh:
        column = io.StringIO(newline="")
        w = csv.writer(column)
        w.writerow(OUTCOMES_HEADER)
        for j, model in enumerate(models):
            col = np.asarray(scores[:, j], dtype=np.float64).tolist()  # Python floats: no numpy read per cell
            w.writerows([pid, model, f"{score:g}", "", responses[i][j] if responses else ""]
                        for i, (pid, score) in enumerate(zip(prompt_ids, col, strict=True)))
            fh.write(column.getvalue())
            column.seek(0)
            column.truncate()
    with open(root / MODELS_FILE, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MODELS_HEADER)
        for model, cost in zip(models, model_costs, strict=True):
            w.writerow([model, f"{cost:g}", ""])
    (root / "DATASET.md").write_text(f"# {root.name}\n\n{description}\n", encoding="utf-8")
    return root
