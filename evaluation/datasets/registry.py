"""The one place that maps dataset names to loaders. Every loader returns records in the common layout.

Record fields: ``sample_id`` (stable across runs), ``context``, ``question``, ``answer_prefix``, ``answer``
(list of strings), ``task``, ``max_new_tokens``, plus optional ``all_classes`` and ``length`` (LongBench) and
``needle``, ``needle_length``, ``needle_depth`` (needle_in_haystack).
Any dataset also loads from a local ``.jsonl`` or ``.parquet`` file in that layout (``--data_files NAME=PATH``);
needle_in_haystack reads such a file as its haystack (a ``context`` column, optionally ``needle``, ``question``).

Names are kvpress's (``evaluation/evaluate_registry.py``), hub sources its ``DATASET_REGISTRY``; ``longbench-e``
is accepted for ``longbench_e`` and ``ruler-<length>`` names RULER generated at that length (``--ruler_length
1024,4096`` sweeps ``ruler-1024`` and ``ruler-4096``, one dataset each on the leaderboard).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from evaluation.config import RULER_LENGTH_PREFIX, ConfigError, EvalConfig, canonical_name, ruler_sources
from evaluation.datasets.needle import NeedleError, generate_needle_grid, needle_from_rows
from evaluation.datasets.ruler_synthetic import generate_task, resolve_tasks

logger = logging.getLogger("kvpress-eval")

REQUIRED_COLUMNS = ("context", "question", "answer")
OPTIONAL_FIELDS = ("all_classes", "length", "needle", "needle_length", "needle_depth")
LONGBENCH_SUBSETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
                     "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en",
                     "lcc", "repobench-p")
LONGBENCH_E_SUBSETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                       "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: how to load it, how it is scored, and how over-long contexts are cut."""

    name: str
    loader: Callable[[EvalConfig, object], list[dict]]
    metric: str  # the name evaluation.metrics.score_dataset knows it by
    truncation: str  # "head" (keep the first tokens, kvpress) or "middle" (LongBench's first + last halves)
    description: str
    version: str = "1"
    capped: bool = True  # --max_samples / --fraction apply; False where a grid of flags defines the samples
    # A --data_files file: the columns it needs, and how its rows become records (None: rows are records).
    required_columns: tuple[str, ...] = REQUIRED_COLUMNS
    from_rows: Callable[[list[dict], EvalConfig, object], list[dict]] | None = None
    # Settings that change this dataset's records beyond the ones every run id holds (the needle grid).
    identity_fields: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> None:
    if spec.name in DATASETS:
        raise ValueError(f"dataset '{spec.name}' is already registered")
    DATASETS[spec.name] = spec


def ruler_length_of(name: str) -> int | None:
    """The length in a ``ruler-<length>`` name, or None for any other name."""
    suffix = name[len(RULER_LENGTH_PREFIX):] if name.startswith(RULER_LENGTH_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def get_dataset(name: str) -> DatasetSpec:
    name = canonical_name(name)
    if name in DATASETS:
        return DATASETS[name]
    length = ruler_length_of(name)
    if length is not None:
        return DatasetSpec(name, lambda config, tokenizer: load_ruler(config, tokenizer, length), "ruler", "head",
                           f"RULER generated offline at {length} tokens")
    close = difflib.get_close_matches(name, DATASETS, n=2, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown dataset '{name}': {hint}choose from {', '.join(sorted(DATASETS))}")


def load_records(name: str, config: EvalConfig, tokenizer) -> list[dict]:
    """The records of dataset ``name``, from ``--data_files`` when given, capped by max_samples/fraction per task."""
    spec = get_dataset(name)
    local = config.data_files.get(name)
    if local:
        records = read_local_file(local, spec.required_columns)
        if spec.from_rows is not None:
            records = spec.from_rows(records, config, tokenizer)
    else:
        records = spec.loader(config, tokenizer)
    normalised = [normalise(record, i, name) for i, record in enumerate(records)]
    return select_samples(normalised, config) if spec.capped else normalised


def normalise(record: dict, index: int, dataset: str) -> dict:
    answer = record.get("answer", record.get("answers"))
    if hasattr(answer, "tolist"):
        answer = answer.tolist()
    answers = [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]
    task = str(record.get("task") or dataset)
    normalised = {
        "sample_id": str(record.get("sample_id", f"{task}-{record.get('index', index)}")),
        "context": str(record["context"]),
        "question": str(record.get("question") or ""),
        "answer_prefix": str(record.get("answer_prefix") or ""),
        "answer": answers,
        "task": task,
        "max_new_tokens": int(record.get("max_new_tokens") or 128),
    }
    for optional in OPTIONAL_FIELDS:
        value = record.get(optional)
        value = value.tolist() if hasattr(value, "tolist") else value
        if value is not None and not (isinstance(value, float) and math.isnan(value)):  # pandas fills gaps with NaN
            normalised[optional] = value
    return normalised


def select_samples(records: list[dict], config: EvalConfig) -> list[dict]:
    """The first ``max_samples`` of each task, then the first ``fraction`` of those (deterministic)."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    selected = []
    for task_records in by_task.values():
        if config.max_samples is not None:
            task_records = task_records[: config.max_samples]
        selected.extend(task_records[: max(1, round(len(task_records) * config.fraction))])
    return selected


def read_local_file(path: str, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict]:
    """Records of a local .jsonl or .parquet file; a missing ``required`` column is a one-line error naming it."""
    file = Path(path)
    try:
        if file.suffix == ".parquet":
            frame = pd.read_parquet(file)
        elif file.suffix in (".jsonl", ".json"):
            frame = pd.read_json(file, lines=file.suffix == ".jsonl")
        else:
            raise ConfigError(f"--data_files '{path}': use a .jsonl or .parquet file")
    except (ValueError, OSError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"--data_files '{path}' could not be read ({type(error).__name__}): check its format") \
            from None
    if "answers" in frame.columns and "answer" not in frame.columns:
        frame = frame.rename(columns={"answers": "answer"})
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ConfigError(f"--data_files '{path}' has no '{missing[0]}' column: this dataset needs "
                          f"{', '.join(required)} (and optionally answer_prefix, task, max_new_tokens)")
    return frame.to_dict(orient="records")


def load_hub(repo: str, data_dir: str | None, split: str = "test") -> list[dict]:
    """A dataset from the Hugging Face hub (needs the network or a local HF cache)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("loading from the hub needs the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(repo, data_dir=data_dir, split=split).to_pandas().to_dict(orient="records")
    except Exception as error:  # connection, missing config, ...: all mean "not available here"
        raise ConfigError(f"could not load {repo} (data_dir={data_dir}) from the hub ({type(error).__name__}): "
                          "go online, or pass a local copy with --data_files") from None


def load_ruler(config: EvalConfig, tokenizer, length: int | None = None) -> list[dict]:
    """RULER: the hub copy (``--data_dir 4096``) or, by default, generated offline for this model's tokenizer at
    ``length`` tokens (``ruler-<length>``) or ``--ruler_length``."""
    if config.data_dir is not None and length is None:
        return load_hub("simonjegou/ruler", config.data_dir)
    length = config.ruler_length if length is None else length
    sources = ruler_sources(config)
    explicit = bool(config.ruler_tasks)
    n = config.max_samples or 500
    records = []
    for task in resolve_tasks(config.ruler_tasks or None, sources):
        try:
            records.extend(generate_task(task, tokenizer, length, n, seed=42, **asdict(sources)))
        except ValueError as error:
            if explicit:
                raise ConfigError(str(error).splitlines()[0].replace("max_seq_length", "--ruler_length")) from None
            logger.warning("RULER task %s skipped: it does not fit %d tokens with this tokenizer", task, length)
    if not records:
        raise ConfigError(f"no RULER task fits --ruler_length {length}: use a larger length")
    return records


def _longbench(subsets: tuple[str, ...], suffix: str) -> Callable[[EvalConfig, object], list[dict]]:
    def load(config: EvalConfig, tokenizer) -> list[dict]:
        chosen = [config.data_dir] if config.data_dir else list(subsets)
        return [record for subset in chosen for record in load_hub("Xnhyacinth/LongBench", subset + suffix)]

    return load


def load_aime25(config: EvalConfig, tokenizer) -> list[dict]:
    records = load_hub("alessiodevoto/aime25", None)
    for index, record in enumerate(records):
        record.setdefault("task", "aime25")
        record["sample_id"] = f"aime25-{index}"
    return records


def _hub(repo: str) -> Callable[[EvalConfig, object], list[dict]]:
    """A kvpress hub dataset: ``load_dataset(repo, data_dir=--data_dir, split="test")``."""

    def load(config: EvalConfig, tokenizer) -> list[dict]:
        return load_hub(repo, config.data_dir)

    return load


def needle_rows(config: EvalConfig) -> list[dict]:
    """The haystack table of --needle_haystack: built in (None), a local .txt/.jsonl/.parquet file, or a hub name."""
    source = config.needle_haystack
    if source is None:
        return []
    path = Path(source).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return [{"context": path.read_text(encoding="utf-8", errors="replace")}]
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return read_local_file(str(path), ("context",))
    return load_hub(source, None)


def needle_from_haystack(rows: list[dict], config: EvalConfig, tokenizer) -> list[dict]:
    """The length x depth grid of needle records built from a haystack table (built-in text when empty)."""
    try:
        if not rows:
            return generate_needle_grid(tokenizer, config.needle_lengths, config.needle_depths)
        haystack, needle = needle_from_rows(rows)
        return generate_needle_grid(tokenizer, config.needle_lengths, config.needle_depths, haystack, needle)
    except NeedleError as error:
        raise ConfigError(str(error)) from None


def load_needle(config: EvalConfig, tokenizer) -> list[dict]:
    return needle_from_haystack(needle_rows(config), config, tokenizer)


register(DatasetSpec("ruler", load_ruler, "ruler", "head",
                     "RULER, generated offline for the model's tokenizer (or simonjegou/ruler with --data_dir)"))
register(DatasetSpec("longbench", _longbench(LONGBENCH_SUBSETS, ""), "longbench", "middle",
                     "LongBench v1, English subsets (Xnhyacinth/LongBench; --data_dir picks one)"))
register(DatasetSpec("longbench_e", _longbench(LONGBENCH_E_SUBSETS, "_e"), "longbench_e", "middle",
                     "LongBench-E, scored per length bucket"))
register(DatasetSpec("aime25", load_aime25, "aime25", "head",
                     "AIME 2025 (alessiodevoto/aime25); use sampled decoding and --num_samples"))
register(DatasetSpec("longbench-v2", _hub("simonjegou/LongBench-v2"), "longbench-v2", "head",
                     "LongBench v2 multiple choice (simonjegou/LongBench-v2)"))
register(DatasetSpec("loogle", _hub("simonjegou/loogle"), "loogle", "head",
                     "LooGLE QA and cloze (simonjegou/loogle; --data_dir picks a task)"))
register(DatasetSpec("zero_scrolls", _hub("simonjegou/zero_scrolls"), "zero_scrolls", "head",
                     "ZeroSCROLLS (simonjegou/zero_scrolls, test split without answers: kvpress scores nothing)"))
register(DatasetSpec("infinitebench", _hub("MaxJeblick/InfiniteBench"), "infinitebench", "head",
                     "InfiniteBench (MaxJeblick/InfiniteBench; --data_dir picks a task)"))
register(DatasetSpec("math500", _hub("alessiodevoto/math500"), "math500", "head",
                     "MATH-500 (alessiodevoto/math500), boxed answers"))
register(DatasetSpec("needle_in_haystack", load_needle, "needle_in_haystack", "head",
                     "needle in a haystack over --needle_lengths x --needle_depths, generated offline",
                     capped=False, required_columns=("context",), from_rows=needle_from_haystack,
                     identity_fields=("needle_lengths", "needle_depths", "needle_haystack")))
