"""The sweep: model x dataset x press x point, each prediction cached as it is made, then scored.

Data flows one way: config -> grid -> model (loaded once) -> dataset records -> questions grouped by context ->
prefill and compress once per context -> answer each question -> append to the run's predictions cache ->
metrics.json. Nothing here reaches back up that line.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import transformers
import yaml
from tqdm import tqdm

from evaluation.cache import (
    CONFIG_FILE,
    METRICS_FILE,
    PredictionCache,
    run_folder_name,
    write_json_atomically,
    write_text_atomically,
)
from evaluation.config import ConfigError, EvalConfig
from evaluation.datasets.registry import get_dataset, load_records
from evaluation.models import load_model, model_fingerprint, resolve_model_path
from evaluation.scoring import score_run
from presses import GenerationSettings, PressError, answer_questions, build_press, get_spec
from presses.pipeline import encode_prompt

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
            points = {"compression_ratio": config.compression_ratio, "threshold": config.threshold,
                      "head_compression_ratio": config.head_compression_ratio}.get(knob, [None])
            if knob and not points:
                raise ConfigError(f"press '{press}' needs --{knob} values (e.g. --{knob} "
                                  f"{'0.5' if knob == 'compression_ratio' else '-4'})")
            grid.extend(RunSpec(dataset, press, knob, value) for value in points)
    for spec in grid:  # build each press once so a bad setting fails now, not after the model loaded
        make_press(spec, config)
    return grid


def make_press(spec: RunSpec, config: EvalConfig):
    kwargs = dict(spec.knob_kwargs)
    if spec.knob == "threshold" and config.decoding:
        kwargs["decoding"] = True
    return build_press(spec.press, **kwargs)


def generation_settings(config: EvalConfig, max_new_tokens: int, sample_index: int = 0) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=config.max_new_tokens or max_new_tokens, do_sample=config.do_sample,
                              temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                              min_p=config.min_p, seed=config.seed + 1000 * sample_index)


def run_identity(config: EvalConfig, spec: RunSpec, press_repr: str, model_revision: str) -> dict:
    """Exactly what changes this run's predictions (see ``evaluation.cache.run_id``)."""
    dataset_spec = get_dataset(spec.dataset)
    return {
        "model": config.model, "model_revision": model_revision, "dtype": config.dtype, "dataset": spec.dataset,
        "dataset_version": dataset_spec.version, "data_dir": config.data_dir,
        "data_files": config.data_files.get(spec.dataset), "ruler_length": config.ruler_length,
        "ruler_tasks": config.ruler_tasks,
        "ruler_sources": [config.essay_path, config.squad_path, config.hotpotqa_path],
        "press": press_repr, "max_context_length": config.max_context_length,
        "max_new_tokens": config.max_new_tokens, "query_aware": config.query_aware,
        "enable_thinking": config.enable_thinking, "generation": asdict(generation_settings(config, 0)),
        "num_samples": config.num_samples, "protocol": PROTOCOL,
    }


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


def truncate_context(ids: torch.Tensor, max_length: int | None, how: str) -> torch.Tensor:
    """Keep the first ``max_length`` tokens (kvpress) or the first and last halves (LongBench's middle cut)."""
    if max_length is None or ids.shape[1] <= max_length:
        return ids
    if how == "middle":
        half = max_length // 2
        return torch.cat([ids[:, :half], ids[:, ids.shape[1] - (max_length - half):]], dim=1)
    return ids[:, :max_length]


def group_by_context(records: list[dict], query_aware: bool) -> list[list[dict]]:
    """Questions sharing a context (and answer prefix) are answered from one prefill; query-aware: one each."""
    if query_aware:
        return [[record] for record in records]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["context"], record["answer_prefix"]), []).append(record)
    return list(groups.values())


def answer_group(model, tokenizer, group: list[dict], press, config: EvalConfig, sample_index: int,
                 truncation: str) -> list[dict]:
    """Prefill one context under ``press`` (its state is reset on entry), answer its questions; one prediction
    record per question."""
    parts = encode_prompt(tokenizer, group[0]["context"], [r["question"] for r in group], group[0]["answer_prefix"],
                          None, config.enable_thinking, config.query_aware)
    device = next(model.parameters()).device
    context_ids = truncate_context(parts.context_ids, config.max_context_length, truncation).to(device)
    # Presses that draw random numbers (random) use torch's global generator: seed it per context so a sample's
    # prediction never depends on what ran before it in the process (resumed runs equal uninterrupted ones).
    torch.manual_seed(zlib.crc32(f"{config.seed}:{group[0]['sample_id']}:{sample_index}".encode()))
    settings = generation_settings(config, max(r["max_new_tokens"] for r in group), sample_index)
    answers, ratio = answer_questions(model, tokenizer, context_ids, [q.to(device) for q in parts.question_ids],
                                      press, settings)
    return [
        {"sample_id": sample_key(record, sample_index, config), "problem_id": record["sample_id"],
         "task": record["task"], "question": record["question"], "answer_prefix": record["answer_prefix"],
         "answer": record["answer"], "prediction": answer.text,
         "compression_ratio": ratio, "answer_compression_ratio": answer.compression_ratio,
         "context_length": int(context_ids.shape[1]), "question_length": int(question.shape[1]),
         "generated_length": len(answer.token_ids), "sample_index": sample_index,
         **{k: record[k] for k in ("all_classes", "length") if k in record}}
        for record, answer, question in zip(group, answers, parts.question_ids, strict=True)
    ]


def sample_key(record: dict, sample_index: int, config: EvalConfig) -> str:
    return record["sample_id"] if config.num_samples == 1 else f"{record['sample_id']}#{sample_index}"


def run_one(model, tokenizer, records: list[dict], spec: RunSpec, config: EvalConfig) -> RunResult:
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
                "environment": environment(config, model),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_text_atomically(folder / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=True))
    truncation = get_dataset(spec.dataset).truncation
    todo = [(group, k) for k in range(config.num_samples) for group in group_by_context(records, config.query_aware)
            if any(sample_key(r, k, config) not in done for r in group)]
    label = f"{spec.dataset} {spec.press}" + (f" {spec.knob}={spec.value}" if spec.knob else "")
    logger.info("%s: %d samples cached, %d contexts to run -> %s", label, len(done), len(todo), folder)
    for group, sample_index in tqdm(todo, desc=label, unit="context", leave=False):
        for prediction in answer_group(model, tokenizer, group, press, config, sample_index, truncation):
            if prediction["sample_id"] not in done:
                cache.append(prediction)
                done[prediction["sample_id"]] = prediction
    metrics = score_run(spec.dataset, list(done.values()))
    write_json_atomically(folder / METRICS_FILE, metrics)
    return RunResult(spec, folder, metrics)


def run_sweep(config: EvalConfig) -> list[RunResult]:
    """Run every cell of the sweep, resuming what is cached; returns one result per cell."""
    grid = sweep_grid(config)
    resolve_model_path(config.model)
    logger.info("loading %s", config.model)
    model, tokenizer = load_model(config.model, config.device, config.dtype, config.attn_implementation)
    results = []
    for dataset in config.dataset:
        records = load_records(dataset, config, tokenizer)
        logger.info("%s: %d samples", dataset, len(records))
        for spec in (s for s in grid if s.dataset == dataset):
            try:
                results.append(run_one(model, tokenizer, records, spec, config))
            except PressError as error:
                raise ConfigError(str(error)) from None
    return results


def results_table(results: list[RunResult]) -> str:
    rows = [f"{'dataset':<12} {'press':<24} {'point':<24} {'score':>7} {'achieved':>9} {'n':>5}  folder"]
    for result in results:
        spec, metrics = result.spec, result.metrics
        point = f"{spec.knob}={spec.value}" if spec.knob else "-"
        achieved = metrics.get("compression_ratio")
        rows.append(f"{spec.dataset:<12} {spec.press:<24} {point:<24} {metrics['overall']:>7.2f} "
                    f"{achieved if achieved is None else round(achieved, 3):>9} {metrics['n_predictions']:>5}  "
                    f"{result.folder}")
    return "\n".join(rows)
