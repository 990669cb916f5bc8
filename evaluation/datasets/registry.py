"""The one place that maps dataset names to loaders. Every loader returns records in the common layout.

Record fields: ``sample_id`` (stable across runs), ``context``, ``question``, ``answer_prefix``, ``answer``
(list of strings), ``task``, ``max_new_tokens``, plus optional ``all_classes`` and ``length`` (LongBench).
Any dataset also loads from a local ``.jsonl`` or ``.parquet`` file in that layout (``--data_files NAME=PATH``).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from evaluation.config import ConfigError, EvalConfig, ruler_sources
from evaluation.datasets.ruler_synthetic import generate_task, resolve_tasks

logger = logging.getLogger("kvpress-eval")

REQUIRED_COLUMNS = ("context", "question", "answer")
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


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> None:
    if spec.name in DATASETS:
        raise ValueError(f"dataset '{spec.name}' is already registered")
    DATASETS[spec.name] = spec


def get_dataset(name: str) -> DatasetSpec:
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, DATASETS, n=2, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown dataset '{name}': {hint}choose from {', '.join(sorted(DATASETS))}")


def load_records(name: str, config: EvalConfig, tokenizer) -> list[dict]:
    """The records of dataset ``name``, from ``--data_files`` when given, capped by max_samples/fraction per task."""
    spec = get_dataset(name)
    local = config.data_files.get(name)
    records = read_local_file(local) if local else spec.loader(config, tokenizer)
    return select_samples([normalise(record, i, name) for i, record in enumerate(records)], config)


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
    for optional in ("all_classes", "length"):
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


def read_local_file(path: str) -> list[dict]:
    """Records of a local .jsonl or .parquet file; a missing column is a one-line error naming it."""
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
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ConfigError(f"--data_files '{path}' has no '{missing[0]}' column: the common layout needs "
                          f"{', '.join(REQUIRED_COLUMNS)} (and optionally answer_prefix, task, max_new_tokens)")
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


def load_ruler(config: EvalConfig, tokenizer) -> list[dict]:
    """RULER: the hub copy (``--data_dir 4096``) or, by default, generated offline for this model's tokenizer."""
    if config.data_dir is not None:
        return load_hub("simonjegou/ruler", config.data_dir)
    sources = ruler_sources(config)
    explicit = bool(config.ruler_tasks)
    n = config.max_samples or 500
    records = []
    for task in resolve_tasks(config.ruler_tasks or None, sources):
        try:
            records.extend(generate_task(task, tokenizer, config.ruler_length, n, seed=42, **asdict(sources)))
        except ValueError as error:
            if explicit:
                raise ConfigError(str(error).splitlines()[0].replace("max_seq_length", "--ruler_length")) from None
            logger.warning("RULER task %s skipped: it does not fit %d tokens with this tokenizer",
                           task, config.ruler_length)
    if not records:
        raise ConfigError(f"no RULER task fits --ruler_length {config.ruler_length}: use a larger length")
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


register(DatasetSpec("ruler", load_ruler, "ruler", "head",
                     "RULER, generated offline for the model's tokenizer (or simonjegou/ruler with --data_dir)"))
register(DatasetSpec("longbench", _longbench(LONGBENCH_SUBSETS, ""), "longbench", "middle",
                     "LongBench v1, English subsets (Xnhyacinth/LongBench; --data_dir picks one)"))
register(DatasetSpec("longbench_e", _longbench(LONGBENCH_E_SUBSETS, "_e"), "longbench_e", "middle",
                     "LongBench-E, scored per length bucket"))
register(DatasetSpec("aime25", load_aime25, "aime25", "head",
                     "AIME 2025 (alessiodevoto/aime25); use sampled decoding and --num_samples"))
