"""Read every run under a results folder, ours and kvpress's, into :class:`Run` records; never write to it.

Our run folders hold ``config.yaml``, ``predictions.jsonl`` and (once the run finished) ``metrics.json``; kvpress's
hold ``config.yaml`` and ``predictions.csv`` and are scored here with our metrics, as ``kvpress-eval import`` would.
A folder that cannot be read becomes a :class:`Skipped` entry with the reason, so one damaged folder costs its own
line on the site, not the whole build.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from evaluation.cache import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, CacheError, PredictionCache
from evaluation.config import ConfigError
from evaluation.kvpress_format import KVPRESS_PREDICTIONS, find_runs, load_kvpress_run
from evaluation.metrics.registry import DATASETS, headline_sample_scores
from evaluation.scoring import score_run
from presses.registry import KNOBS

REFERENCE_PRESS = "no_press"
EXAMPLES_PER_RUN = 3
OURS, KVPRESS = "kvpress-eval", "kvpress"
# memory and speed fields a run's metrics.json may carry (written by the compact cache); shown when present
MEASURES = ("kv_bytes_dense", "kv_bytes_held", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")

Sample = tuple[str, str, float]  # (sample_id, task, score in percent)


@dataclass(frozen=True)
class Run:
    """One run folder as the site shows it; ``metrics`` is None while the run has no metrics.json yet."""

    name: str  # folder path relative to the results folder (posix)
    folder: Path
    source: str  # OURS or KVPRESS
    model: str
    dataset: str  # our dataset name (kvpress names mapped)
    data_dir: str | None  # RULER length or LongBench subset: runs with different ones are not compared
    press: str  # registry name
    press_repr: str  # the constructor call (ours) or kvpress's press_init_command, else the name
    knob: str | None
    value: float | None
    started: str | None
    config: dict
    settings: tuple[tuple[str, str], ...]  # generation and prompt settings worth a glance
    metrics: dict | None
    n_predictions: int
    examples: tuple[dict, ...]  # the first few predictions, shown on the page
    files: tuple[Path, ...]  # raw files the site copies and links to
    samples: tuple[Sample, ...] = ()  # (sample_id, task, headline score in percent) of a finished run, for intervals
    variant: str = ""  # a setting that makes the press another method on the plot (chunked prefill)

    @property
    def label(self) -> str:
        """The press's line on the plot: kvpress's runs of a press stay apart from ours, and so do variants (a
        chunked prefill changes what a threshold press keeps)."""
        press = f"{self.press} ({self.variant})" if self.variant else self.press
        return press if self.source == OURS else f"{press} ({KVPRESS})"

    @property
    def point(self) -> str:
        return f"{self.knob}={self.value:g}" if self.knob and self.value is not None else "default"

    @property
    def n_samples(self) -> int:
        """Predictions scored (metrics.json's count), or made so far for a run that has no metrics yet."""
        counted = None if self.metrics is None else self.metrics.get("n_predictions")
        return counted if isinstance(counted, int) else self.n_predictions

    def measure(self, field: str) -> float | None:
        """A memory or speed field of metrics.json (:data:`MEASURES`), None when not measured. ``kv_bytes_held`` may
        be a number or ``{"after_prefill": x, "end": y}``; the held bytes at the end of generation are preferred."""
        value = None if self.metrics is None else self.metrics.get(field)
        if isinstance(value, dict):
            value = value.get("end", value.get("after_prefill"))
        return float(value) if _is_number(value) else None

    @property
    def kv_peak(self) -> float | None:
        """The most KV bytes the cache held at once: ``peak_memory_bytes``, unless that is the CUDA allocator's
        (weights and activations included), which keeps the cache's own peak as ``kv_bytes_peak``. So the column
        compares like with like when a GPU sweep mixes batched cells with cells run one context at a time."""
        return self.measure("kv_bytes_peak" if self.device_peak is not None else "peak_memory_bytes")

    @property
    def device_peak(self) -> float | None:
        """The CUDA allocator's peak over a context (``peak_memory_source: cuda_allocator``), None otherwise."""
        if self.metrics is None or self.metrics.get("peak_memory_source") != "cuda_allocator":
            return None
        return self.measure("peak_memory_bytes")

    @property
    def kv_fraction(self) -> float | None:
        """KV bytes held / dense, when both were measured."""
        held, dense = self.measure("kv_bytes_held"), self.measure("kv_bytes_dense")
        return held / dense if held is not None and dense else None

    @property
    def by_length_depth(self) -> tuple[dict, ...]:
        """The needle-in-a-haystack grid of metrics.json (cells with a numeric length, depth and score only)."""
        cells = [] if self.metrics is None else self.metrics.get("by_length_depth") or []
        return tuple(cell for cell in cells if isinstance(cell, dict)
                     and all(_is_number(cell.get(key)) for key in ("length", "depth", "score")))

    @property
    def is_reference(self) -> bool:
        return self.press == REFERENCE_PRESS

    @property
    def accuracy(self) -> float | None:
        return None if self.metrics is None else self.metrics["overall"]

    @property
    def compression(self) -> float | None:
        """Achieved (not requested) compression; the reference sits at 0 by definition."""
        if self.metrics is None:
            return None
        return 0.0 if self.is_reference else self.metrics.get("compression_ratio")


@dataclass(frozen=True)
class Skipped:
    """A folder that looked like a run but could not be read."""

    name: str
    reason: str


@dataclass(frozen=True)
class Results:
    """What a results folder holds: the runs read and the folders that could not be."""

    runs: tuple[Run, ...]
    skipped: tuple[Skipped, ...]


def read_results(results: str | Path | Sequence[str | Path], exclude: Sequence[Path] = ()) -> Results:
    """Every run folder under ``results`` (sorted), skipping anything under ``exclude`` (sites built inside it).
    Several folders (a sweep's shards) are read as one; run names then start with each folder's name.

    Raises :class:`ConfigError` when ``results`` is not a folder; an empty folder gives empty results.
    """
    if isinstance(results, (list, tuple)):
        if len(results) == 1:
            return read_results(results[0], exclude)
        parts = [read_results(root, exclude) for root in results]
        runs = [replace(run, name=f"{Path(root).resolve().name}/{run.name}")
                for root, part in zip(results, parts, strict=True) for run in part.runs]
        skipped = [replace(skip, name=f"{Path(root).resolve().name}/{skip.name}")
                   for root, part in zip(results, parts, strict=True) for skip in part.skipped]
        return Results(tuple(sorted(runs, key=lambda run: run.name)), tuple(skipped))
    root = Path(results)
    markers = (CONFIG_FILE, PREDICTIONS_FILE, KVPRESS_PREDICTIONS)
    folders = sorted({folder for marker in markers for folder in find_runs(root, marker)})
    excluded = [path.resolve() for path in exclude]
    folders = [f for f in folders if not any(f.resolve().is_relative_to(path) for path in excluded)]
    runs, skipped = [], []
    for folder in folders:
        name = folder.relative_to(root).as_posix()
        try:
            runs.append(_read_kvpress(folder, name) if (folder / KVPRESS_PREDICTIONS).is_file()
                        else _read_ours(folder, name))
        except (CacheError, ConfigError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
            skipped.append(Skipped(name, f"{type(error).__name__}: {error}"))
    return Results(tuple(runs), tuple(skipped))


def _read_ours(folder: Path, name: str) -> Run:
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{PREDICTIONS_FILE} without {CONFIG_FILE}: not a kvpress-eval run folder")
    config = _mapping(yaml.safe_load((folder / CONFIG_FILE).read_text()), CONFIG_FILE)
    run = _mapping(config.get("run"), f"'run' in {CONFIG_FILE}")
    knob = next((k for k in KNOBS if k in config), None)
    predictions = _read_predictions(folder)
    metrics_file = folder / METRICS_FILE
    metrics = _checked_metrics(json.loads(metrics_file.read_text())) if metrics_file.is_file() else None
    settings = {**_mapping(run.get("generation") or {}, "'run.generation'"),
                **{k: run[k] for k in ("max_new_tokens", "max_context_length", "query_aware", "enable_thinking",
                                       "num_samples", "dtype", "ruler_length") if k in run},
                **{f"env.{k}": v for k, v in (config.get("environment") or {}).items()
                   if k in ("device", "dtype", "attn_implementation", "torch", "transformers", "git_revision")}}
    return Run(
        name=name, folder=folder, source=OURS, model=str(run["model"]), dataset=str(run["dataset"]),
        data_dir=_optional_str(run.get("data_dir")), press=str(config["press"]),
        press_repr=str(run.get("press") or config["press"]), knob=knob, value=_optional_float(config.get(knob)),
        started=_optional_str(config.get("started")), config=config, settings=_pairs(settings), metrics=metrics,
        n_predictions=len(predictions), examples=tuple(predictions[:EXAMPLES_PER_RUN]),
        files=tuple(folder / f for f in (CONFIG_FILE, PREDICTIONS_FILE, METRICS_FILE) if (folder / f).is_file()),
        samples=_samples(metrics, predictions),
        variant=f"prefill chunks of {run['prefill_chunk_size']}" if run.get("prefill_chunk_size") else "")


def _read_predictions(folder: Path) -> list[dict]:
    """The run's finished predictions. ``PredictionCache.load`` cuts an incomplete last line off in place, so it
    reads a copy: a sweep may still be appending to the original."""
    if not (folder / PREDICTIONS_FILE).is_file():
        return []
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copyfile(folder / PREDICTIONS_FILE, Path(scratch) / PREDICTIONS_FILE)
        return list(PredictionCache(scratch).load().values())


def _read_kvpress(folder: Path, name: str) -> Run:
    run = load_kvpress_run(folder)
    config, records, dataset, press, knob, value = (run.config, run.records, run.dataset, run.press, run.knob,
                                                     run.value)
    metrics = score_run(dataset, records) if records else None
    settings = {k: config[k] for k in ("max_new_tokens", "max_context_length", "query_aware", "fraction", "seed",
                                       "device") if k in config}
    return Run(
        name=name, folder=folder, source=KVPRESS, model=str(config.get("model", "unknown")), dataset=dataset,
        data_dir=_optional_str(config.get("data_dir")), press=press,
        press_repr=str(config.get("press_init_command") or press), knob=knob, value=value, started=None,
        config=config, settings=_pairs(settings), metrics=metrics, n_predictions=len(records),
        examples=tuple(records[:EXAMPLES_PER_RUN]),
        files=tuple(folder / f for f in (CONFIG_FILE, KVPRESS_PREDICTIONS, METRICS_FILE) if (folder / f).is_file()),
        samples=_samples(metrics, records))


def _samples(metrics: dict | None, predictions: list[dict]) -> tuple[Sample, ...]:
    """Each prediction's headline score (percent) under the scoring metrics.json names, for the bootstrap; none for
    a run without metrics, or whose scoring is not registered here (its scores are shown without an interval)."""
    scoring = None if metrics is None else metrics.get("dataset")
    if not predictions or not isinstance(scoring, str) or scoring not in DATASETS:
        return ()
    style = metrics.get("style") if metrics.get("style") in DATASETS.get(scoring).styles else None
    try:
        scores = headline_sample_scores(scoring, predictions, style)
    except (ValueError, KeyError, TypeError):  # a hand-edited record: the run is still shown, without intervals
        return ()
    return tuple((str(p.get("sample_id", i)), str(p["task"]), 100 * score)
                 for i, (p, score) in enumerate(zip(predictions, scores, strict=True)))


def _checked_metrics(metrics: object) -> dict:
    """metrics.json as the site reads it: numbers where numbers are plotted, so a hand edit fails here, by name."""
    metrics = _mapping(metrics, METRICS_FILE)
    if not _is_number(metrics.get("overall")):
        raise ValueError(f"{METRICS_FILE} has no numeric 'overall'")
    if metrics.get("compression_ratio") is not None and not _is_number(metrics["compression_ratio"]):
        raise ValueError(f"{METRICS_FILE}: 'compression_ratio' is not a number")
    _mapping(metrics.get("per_task", {}), f"'per_task' in {METRICS_FILE}")
    _mapping(metrics.get("metric", {}), f"'metric' in {METRICS_FILE}")
    return metrics


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mapping(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a mapping")
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def _pairs(settings: dict) -> tuple[tuple[str, str], ...]:
    return tuple((str(key), "-" if value is None else str(value)) for key, value in settings.items())
