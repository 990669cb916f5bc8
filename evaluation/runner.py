"""The sweep: model x dataset x press x point, each prediction cached as it is made, then scored.

Data flows one way: config -> grid -> model (loaded once) -> dataset records -> questions grouped by context ->
prefill and compress once per context -> answer each question -> append to the run's predictions cache ->
metrics.json. Nothing here reaches back up that line.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from evaluation.cache import METRICS_FILE, PredictionCache, run_folder_name, write_json_atomically
from evaluation.config import ConfigError, EvalConfig
from evaluation.datasets.registry import get_dataset, load_records, ruler_length_of
from evaluation.engine import (
    PreparedRun,
    engine_refusal,
    execute,
    execute_sequentially,
    generation_settings,
    group_by_context,
    sample_key,
)
from evaluation.models import model_fingerprint
from evaluation.provenance import coverage_note, describe_samples, record_start
from evaluation.scoring import score_run
from presses import PressError, build_press, get_spec

logger = logging.getLogger("kvpress-eval")
PROTOCOL = "kvpress-v1"  # chat template (thinking off by default), question after compression, answer prefix


@dataclass(frozen=True)
class RunSpec:
    """One cell of the sweep: a press at one point on one dataset."""

    dataset: str
    press: str
    knob: str | None
    value: float | None

    @property
    def knob_kwargs(self) -> dict:
        return {self.knob: self.value} if self.knob else {}


@dataclass
class RunResult:
    spec: RunSpec
    folder: Path
    metrics: dict


def sweep_grid(config: EvalConfig) -> list[RunSpec]:
    """Every (dataset, press, point); each press gets the points of its own knob. Checked before any model loads."""
    grid = []
    for dataset in config.dataset:
        get_dataset(dataset)
        for press in config.press:
            knob = get_spec(press).knob
            points = getattr(config, knob) if knob else [None]
            if knob and not points:
                raise ConfigError(f"press '{press}' needs --{knob} values (e.g. --{knob} "
                                  f"{'-4' if knob == 'threshold' else '0.5'})")
            grid.extend(RunSpec(dataset, press, knob, value) for value in points)
    for spec in grid:  # build each press once so a bad setting fails now, not after the model loaded
        if make_press(spec, config).needs_question and not config.query_aware:
            raise ConfigError(f"press '{spec.press}' compresses the context with its question: add --query_aware true")
    return grid


def make_press(spec: RunSpec, config: EvalConfig):
    kwargs = dict(spec.knob_kwargs)
    if spec.knob == "threshold" and config.decoding:
        kwargs["decoding"] = True
    return build_press(spec.press, **kwargs)


def run_identity(config: EvalConfig, spec: RunSpec, press_repr: str, model_revision: str) -> dict:
    """Exactly what changes this run's predictions (see ``evaluation.cache.run_id``)."""
    dataset_spec = get_dataset(spec.dataset)
    return {
        "model": config.model, "model_revision": model_revision, "dtype": config.dtype, "dataset": spec.dataset,
        "dataset_version": dataset_spec.version, "data_dir": config.data_dir,
        "data_files": config.data_files.get(spec.dataset),
        # A ruler-<length> run is identified by its own length, not by the whole --ruler_length list.
        "ruler_length": ruler_length_of(spec.dataset) or config.ruler_length,
        "ruler_tasks": config.ruler_tasks,
        "ruler_sources": [config.essay_path, config.squad_path, config.hotpotqa_path],
        "press": press_repr, "max_context_length": config.max_context_length,
        "max_new_tokens": config.max_new_tokens, "query_aware": config.query_aware,
        "enable_thinking": config.enable_thinking, "generation": asdict(generation_settings(config, 0)),
        "num_samples": config.num_samples, "protocol": PROTOCOL,
        **{name: getattr(config, name) for name in dataset_spec.identity_fields},  # e.g. the needle grid
        # only where it applies, so runs without it keep their ids
        **({"prefill_chunk_size": chunk} if (chunk := prefill_chunk_size(config, spec)) else {}),
    }


def prefill_chunk_size(config: EvalConfig, spec: RunSpec) -> int | None:
    """The chunk size this cell prefills with: ``--prefill_chunk_size`` for threshold presses, else None."""
    return config.prefill_chunk_size if spec.knob == "threshold" else None


def environment(config: EvalConfig, model) -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        revision = "unknown"
    return {"torch": str(torch.__version__), "transformers": transformers.__version__,
            "kvpress_eval": version("kvpress-eval"), "git_revision": revision, "python": platform.python_version(),
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "attn_implementation": model.config._attn_implementation}


def prepare_run(model, tokenizer, spec: RunSpec, config: EvalConfig) -> PreparedRun:
    """Build the cell's press, open (or clear with ``--overwrite``) its cache and write its config.yaml."""
    # One press per run: entering it resets its state, and what it loads once (a KVzap surrogate) is not reloaded
    # for every context. Entering it now fails before any folder exists on a missing surrogate or tokenizer.
    press = make_press(spec, config)
    with press(model, tokenizer):
        pass
    identity = run_identity(config, spec, repr(press), model_fingerprint(config.model))
    folder = Path(config.output_dir) / run_folder_name(config.model, spec.dataset, spec.press, spec.knob,
                                                        spec.value, identity)
    cache = PredictionCache(folder)
    if config.overwrite:
        cache.clear()
    done = cache.load()
    folder.mkdir(parents=True, exist_ok=True)
    resolved = {"run": identity, "press": spec.press, spec.knob or "knob": spec.value, "config": asdict(config),
                "environment": environment(config, model)}
    record_start(folder, resolved, config, cached=len(done))  # first start, or a resume appended to config.yaml
    return PreparedRun(spec, run_label(spec), spec.dataset, press, folder, cache, done,
                       lambda: make_press(spec, config), prefill_chunk_size(config, spec))


def finish_run(run: PreparedRun, records: list[dict], config: EvalConfig) -> RunResult:
    # In sample order, not cache order (the engine appends answers as rows finish): a resumed run scores equal.
    scores = score_run(run.spec.dataset, [run.done[key] for key in sorted(run.done)])
    asked = {sample_key(r, k, config) for k in range(config.num_samples) for r in records}
    metrics = describe_samples(scores, sorted(run.done), asked)
    metrics.update(memory_and_speed([run.done[key] for key in sorted(run.done)]))
    write_json_atomically(run.folder / METRICS_FILE, metrics)
    return RunResult(run.spec, run.folder, metrics)


def memory_and_speed(predictions: list[dict]) -> dict:
    """metrics.json's memory and speed fields, from the cost each prediction recorded (``answer_cost``).

    KV bytes are means over answers (each answer's context); ``kv_bytes_held`` is after the prefill and at the end
    of generation. ``peak_memory_bytes`` is the largest peak of any context: on a GPU, one context at a time, the
    CUDA allocator's (weights, activations and cache; ``peak_memory_source: cuda_allocator``, and the cache's own
    peak beside it as ``kv_bytes_peak``); otherwise the cache's tensors' (``kv_cache_tensors``: a CPU has no
    allocator to ask, and the sweep engine's rows share their memory, so no allocator peak is a cell's). Throughputs:
    context tokens over prefill time (each context's prefill counted once),
    generated tokens over decoding time; in a batched sweep both are shared by its cells (``throughput_scope``).
    Predictions cached before these fields existed are left out; none at all gives an empty dict.
    """
    costed = [p for p in predictions if "kv_bytes_dense" in p]
    if not costed:
        return {}
    def mean(name: str) -> float:
        return sum(p[name] for p in costed) / len(costed)
    prefill_seconds = sum(p["prefill_seconds"] for p in costed)
    prefill_tokens = sum(p["context_length"] for p in costed if p["prefill_seconds"] > 0)
    decode_seconds = sum(p["decode_seconds"] for p in costed)
    storages = sorted({p["kv_storage"] for p in costed})
    sources = sorted({p.get("kv_bytes_held_source", "cache") for p in costed})
    return {
        "kv_storage": storages[0] if len(storages) == 1 else "mixed",
        "kv_bytes_held_source": sources[0] if len(sources) == 1 else "mixed",
        "kv_bytes_dense": mean("kv_bytes_dense"),
        "kv_bytes_held": {"after_prefill": mean("kv_bytes_held_after_prefill"), "end": mean("kv_bytes_held_end")},
        **peak_memory(costed),
        "prefill_tokens_per_s": prefill_tokens / prefill_seconds if prefill_seconds else None,
        "decode_tokens_per_s": sum(p["generated_length"] for p in costed) / decode_seconds if decode_seconds else None,
        "throughput_scope": "sweep" if any(p["throughput_scope"] == "sweep" for p in costed) else "run",
    }


def peak_memory(costed: list[dict]) -> dict:
    """The allocator's peak where every answer has one (a run resumed on another machine mixes them: then the
    cache's peak, which every answer has)."""
    kv_peak = max(p["kv_bytes_peak"] for p in costed)
    if all(p.get("device_peak_bytes") is not None for p in costed):
        return {"peak_memory_bytes": max(p["device_peak_bytes"] for p in costed),
                "peak_memory_source": "cuda_allocator", "kv_bytes_peak": kv_peak}
    return {"peak_memory_bytes": kv_peak, "peak_memory_source": "kv_cache_tensors"}


def run_label(spec: RunSpec) -> str:
    return f"{spec.dataset} {spec.press}" + (f" {spec.knob}={spec.value}" if spec.knob else "")


def count_missing(runs: list[PreparedRun], groups: list[list[dict]], config: EvalConfig) -> int:
    return sum(len(run.missing(group, k, config)) for run in runs for group in groups
               for k in range(config.num_samples))


def run_cells(model, tokenizer, config: EvalConfig, specs: list[RunSpec]) -> list[RunResult]:
    """Run these cells of the sweep with a loaded model, resuming what is cached; one result per cell. Every
    executor ends here: the local one with all cells of a shard, each Ray worker with the cells it is handed.

    The plan (folders, caches, configs) is made here; the execution is the sweep engine
    (:mod:`evaluation.engine`: one prefill per context for every cell, answers decoded in batches) or, with
    ``--engine sequential``, one context and one cell at a time.
    """
    datasets = list(dict.fromkeys(spec.dataset for spec in specs))
    records = {dataset: load_records(dataset, config, tokenizer) for dataset in datasets}
    prepared = []
    for spec in specs:
        try:
            prepared.append(prepare_run(model, tokenizer, spec, config))
        except PressError as error:
            raise ConfigError(str(error)) from None
    total = 0
    for run in prepared:
        groups = group_by_context(records[run.spec.dataset], config.query_aware)
        missing = count_missing([run], groups, config)
        total += missing
        logger.info("%s: %d samples cached, %d to run -> %s", run.label, len(run.done), missing,
                    run.folder)
    with tqdm(total=total, desc="sweep", unit="answer", dynamic_ncols=True) as progress:
        for dataset in datasets:
            runs = [run for run in prepared if run.spec.dataset == dataset]
            logger.info("%s: %d samples", dataset, len(records[dataset]))
            refusals = {run.label: engine_refusal(model, run.press, config.kv_storage, bool(run.prefill_chunk_size))
                        for run in runs}
            batched = [run for run in runs if config.engine == "batched" and refusals[run.label] is None]
            for run in runs:
                if run not in batched and config.engine == "batched":
                    logger.info("%s: runs one context at a time (%s)", run.label, refusals[run.label])
            try:
                if batched:
                    execute(model, tokenizer, records[dataset], batched, config, progress)
                for run in runs:
                    if run not in batched:
                        execute_sequentially(model, tokenizer, records[dataset], run, config, progress)
            except PressError as error:
                raise ConfigError(str(error)) from None
    return [finish_run(run, records[run.spec.dataset], config) for run in prepared]


def kv_held_share(metrics: dict) -> str:
    """KV bytes held after the prefill over a dense cache's, as a percentage ("-" if not measured)."""
    held, dense = metrics.get("kv_bytes_held"), metrics.get("kv_bytes_dense")
    if not held or not dense:
        return "-"
    return f"{100 * held['after_prefill'] / dense:.0f}%"


def results_table(results: list[RunResult]) -> str:
    width = max([len("dataset"), *(len(result.spec.dataset) for result in results)])
    rows = [f"{'dataset':<{width}} {'press':<24} {'point':<24} {'score':>7} {'achieved':>9} {'KV held':>8} "
            f"{'n':>5}  folder"]
    notes = []
    for result in results:
        spec, metrics = result.spec, result.metrics
        point = f"{spec.knob}={spec.value}" if spec.knob else "-"
        achieved = metrics.get("compression_ratio")
        note = coverage_note(metrics)
        rows.append(f"{spec.dataset:<{width}} {spec.press:<24} {point:<24} {metrics['overall']:>7.2f} "
                    f"{achieved if achieved is None else round(achieved, 3):>9} {kv_held_share(metrics):>8} "
                    f"{metrics['n_predictions']:>5}"
                    f"{'*' if note else ' '} {result.folder}")
        if note:
            notes.append(f"* {spec.dataset} {spec.press} {point}: {note}")
    if notes:
        notes.append("  (these scores include samples cached by an earlier, larger invocation; metrics.json lists "
                     "them under 'samples')")
    return "\n".join(rows + notes)
