"""Export runs to kvpress's results layout and import kvpress runs, so results from either tool can be compared.

kvpress (``evaluation/evaluate.py``) writes one folder per run,
``<dataset>__[<data_dir>__]<model with / as -->__<press_name>__<ratio or threshold, 2 decimals>``, holding

- ``predictions.csv``: the dataset's columns minus ``context``, plus ``predicted_answer`` and ``compression_ratio``;
- ``metrics.json``: its scorer's output (RULER: ``{task: {"string_match": score}}``; LongBench: ``{task: score}``;
  AIME25: ``{"correct", "answered", "accuracy", "total"}``);
- ``config.yaml``: its ``EvaluationConfig`` (``dataset``, ``data_dir``, ``model``, ``press_name``,
  ``compression_ratio``, ``threshold``, ``fraction``, ``max_new_tokens``, ``max_context_length``, ``query_aware``,
  ``seed``, ``press_init_command``, ...).

Export writes that layout from our run folders (our metrics mapped to kvpress's shapes; the compression column is
the compression the press achieved, where kvpress writes the requested ratio). Import turns kvpress folders into
our layout (``predictions.jsonl``, ``config.yaml``, ``metrics.json`` rescored with our metrics) so the leaderboard
and ``compare`` read them beside our own runs. Lists stored by pandas as text (``"['a', 'b']"``) are parsed back.
"""

from __future__ import annotations

import ast
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from evaluation.cache import (
    CONFIG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    CacheError,
    PredictionCache,
    run_folder_name,
    write_json_atomically,
    write_text_atomically,
)
from evaluation.config import ConfigError
from evaluation.scoring import score_run
from presses import PRESSES

logger = logging.getLogger("kvpress-eval")

KVPRESS_PREDICTIONS = "predictions.csv"
KVPRESS_DATASETS = {"ruler": "ruler", "longbench": "longbench", "longbench-e": "longbench_e",
                    "longbench_e": "longbench_e", "aime25": "aime25", "longbench-v2": "longbench-v2",
                    "loogle": "loogle", "zero_scrolls": "zero_scrolls", "infinitebench": "infinitebench",
                    "needle_in_haystack": "needle_in_haystack", "math500": "math500"}
LIST_COLUMNS = ("answer", "answers", "all_classes")


def find_runs(results: str | Path, marker: str) -> list[Path]:
    """Folders under ``results`` (itself included) that hold a ``marker`` file, sorted."""
    root = Path(results)
    if not root.is_dir():
        raise ConfigError(f"'{results}' is not a folder of results: check the path")
    return sorted(path.parent for path in root.rglob(marker))


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


def kvpress_metrics(dataset: str, metrics: dict) -> dict:
    """Our metrics.json in the shape kvpress's scorer writes for ``dataset``."""
    per_task = metrics["per_task"]
    if dataset.startswith("ruler-"):  # one length of a multi-length sweep: kvpress's ruler with that data_dir
        dataset = "ruler"
    if dataset == "needle_in_haystack":
        return {"rouge1": next(iter(per_task.values()))["needle_rouge1_kvpress"]}
    if dataset == "ruler":
        return {task: {"string_match": scores[metrics["metric"][task]]} for task, scores in per_task.items()}
    if dataset == "aime25":
        scores = next(iter(per_task.values()))
        total = metrics["n_predictions"]
        return {"correct": round(scores["aime_accuracy_kvpress"] * total / 100), "answered":
                round(scores["aime_answered_kvpress"] * total / 100), "accuracy": scores["aime_accuracy_kvpress"] / 100,
                "total": total}
    return {task: scores[metrics["metric"][task]] for task, scores in per_task.items()}


def kvpress_folder_name(dataset: str, data_dir: str | None, model: str, press: str, value: float | None) -> str:
    if dataset.startswith("ruler-"):
        dataset, data_dir = "ruler", dataset[len("ruler-"):]
    kvpress_dataset = "longbench-e" if dataset == "longbench_e" else dataset
    parts = [kvpress_dataset, data_dir or "", model.rstrip("/").replace("/", "--"), press, f"{value or 0.0:.2f}"]
    return "__".join(part for part in parts if part)


def export_run(folder: Path, out: Path) -> Path:
    """Write one of our run folders in kvpress's layout under ``out``; returns the folder written."""
    resolved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    identity, settings = resolved["run"], resolved["config"]
    predictions = list(PredictionCache(folder).load().values())
    if not predictions:
        raise CacheError(f"{folder} has no predictions yet: finish the run before exporting it")
    dataset, press = identity["dataset"], resolved["press"]
    knob = PRESSES[press].knob if press in PRESSES else None
    value = resolved.get(knob) if knob else None
    target = out / kvpress_folder_name(dataset, identity.get("data_dir"), Path(identity["model"]).name, press, value)
    if target.exists():  # two of our runs map to one kvpress name (they differ in a setting kvpress does not name)
        target = target.with_name(f"{target.name}__{folder.name.rsplit('__', 1)[-1]}")
    target.mkdir(parents=True)
    frame = pd.DataFrame(predictions).rename(columns={"prediction": "predicted_answer"})
    frame.to_csv(target / KVPRESS_PREDICTIONS, index=False)
    metrics = score_run(dataset, predictions)
    write_json_atomically(target / METRICS_FILE, kvpress_metrics(dataset, metrics))
    kvpress_dataset, data_dir = dataset, identity.get("data_dir")
    if dataset.startswith("ruler-"):  # one length of a multi-length sweep: kvpress's ruler, that length's data_dir
        kvpress_dataset, data_dir = "ruler", dataset[len("ruler-"):]
    config = {"dataset": "longbench-e" if dataset == "longbench_e" else kvpress_dataset, "data_dir": data_dir,
              "model": identity["model"], "device": resolved.get("environment", {}).get("device"),
              "press_name": press, "compression_ratio": value if knob == "compression_ratio" else 0.0,
              "threshold": value if knob == "threshold" else None,
              "key_channel_compression_ratio": value if knob == "key_channel_compression_ratio" else None,
              "fraction": settings.get("fraction", 1.0),
              **({"head_compression_ratio": value} if knob == "head_compression_ratio" else {}),
              "max_new_tokens": identity.get("max_new_tokens"),
              "max_context_length": identity.get("max_context_length"), "query_aware": identity.get("query_aware"),
              "seed": settings.get("seed"), "press_init_command": identity.get("press"), "output_dir": str(out)}
    write_text_atomically(target / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return target


def export_kvpress(results: str = "results/runs", out: str = "kvpress_results") -> list[Path]:
    """Export every run under ``results`` with predictions to kvpress's layout under ``out`` (a new folder)."""
    runs = find_runs(results, PREDICTIONS_FILE)
    if not runs:
        raise ConfigError(f"no runs with predictions under '{results}': run kvpress-eval first")
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise ConfigError(f"'{out}' already holds files: export into a new or empty folder")
    return [export_run(folder, out_path) for folder in runs]


# --------------------------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------------------------


def _as_list(value):
    if isinstance(value, str) and value.startswith("["):
        try:
            return list(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            return value
    return value


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def config_from_folder_name(name: str) -> dict:
    """What a kvpress run folder's name says: ``<dataset>__[<data_dir>__]<model with / as -->__<press>__<value>``
    (the layout of kvpress's runs and of the kvpress leaderboard's ``benchmark/`` folder). Empty when the name does
    not have that shape. The value is a ratio, or a threshold when negative."""
    parts = name.split("__")
    if len(parts) not in (4, 5) or str(parts[0]) not in KVPRESS_DATASETS:
        return {}
    try:
        value = float(parts[-1])
    except ValueError:
        return {}
    config = {"dataset": parts[0], "model": parts[-3].replace("--", "/"), "press_name": parts[-2]}
    if len(parts) == 5:
        config["data_dir"] = parts[1]
    config["threshold" if value < 0 else "compression_ratio"] = value
    return config


def read_kvpress_run(folder: Path) -> tuple[dict, list[dict]]:
    """(kvpress config, our prediction records) of one kvpress run folder; a one-line error if it is not one.

    config.yaml is read where present; what it lacks (or all of it, where it is missing) comes from the folder's name,
    as in the kvpress leaderboard's ``benchmark/<dataset>__<data_dir>__<model>__<press>__<ratio>/``.
    """
    config_file, predictions_file = folder / CONFIG_FILE, folder / KVPRESS_PREDICTIONS
    named = config_from_folder_name(folder.name)
    if not config_file.is_file() and not named:
        raise ConfigError(f"{folder} has {KVPRESS_PREDICTIONS} but no {CONFIG_FILE}: not a kvpress run folder")
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    config = {**named, **{key: value for key, value in config.items() if value is not None or key not in named}}
    frame = pd.read_csv(predictions_file)
    # needle_in_haystack frames have no answer column: the needle is what the answer is scored against.
    answer_column = next((c for c in ("answer", "answers", "needle") if c in frame.columns), "answer")
    missing = [c for c in ("predicted_answer", answer_column) if c not in frame.columns]
    if missing or "dataset" not in config:
        what = f"column '{missing[0]}'" if missing else f"'dataset' in {CONFIG_FILE}"
        raise ConfigError(f"{folder}: no {what}: not a kvpress results folder")
    records, seen = [], {}
    for row in frame.to_dict(orient="records"):
        task = str(row.get("task") if not _missing(row.get("task")) else config["dataset"])
        seen[task] = seen.get(task, -1) + 1
        answer = _as_list(row[answer_column])
        record = {"sample_id": f"{task}-{seen[task]}", "problem_id": f"{task}-{seen[task]}", "task": task,
                  "question": "" if _missing(row.get("question")) else str(row["question"]),
                  "answer": [str(a) for a in answer] if isinstance(answer, list) else [str(answer)],
                  "prediction": "" if _missing(row["predicted_answer"]) else str(row["predicted_answer"]),
                  "compression_ratio": None if _missing(row.get("compression_ratio")) else
                  float(row["compression_ratio"])}
        if not _missing(row.get("all_classes")):
            record["all_classes"] = _as_list(row["all_classes"])
        if not _missing(row.get("length")):
            record["length"] = int(row["length"])
        if not _missing(row.get("needle_depth")):  # kvpress runs one max_context_length: the grid's length
            record["needle_depth"] = float(row["needle_depth"])
            length = row.get("needle_length")  # our exports carry it; kvpress's own runs have one length per run
            record["needle_length"] = int(config.get("max_context_length") or 0) if _missing(length) else int(length)
        records.append(record)
    return config, records


@dataclass(frozen=True)
class KvpressRun:
    """A kvpress run folder read and interpreted: our dataset name, the press's knob and point, our records."""

    config: dict
    records: list[dict]
    dataset: str
    press: str
    knob: str | None
    value: float | None


def load_kvpress_run(folder: Path) -> KvpressRun:
    """Read one kvpress run folder. The knob is the registry's for a press we know, else ``threshold`` when kvpress
    recorded one, else ``compression_ratio`` (none for ``no_press``). kvpress records the requested ratio, or nothing,
    where we record the achieved one: records without a compression get the requested ratio (0 for ``no_press``)."""
    config, records = read_kvpress_run(folder)
    dataset = KVPRESS_DATASETS.get(str(config["dataset"]))
    if dataset is None:
        raise ConfigError(f"{folder}: kvpress dataset '{config['dataset']}' has no scorer here: "
                          f"choose from {', '.join(sorted(KVPRESS_DATASETS))}")
    press = str(config.get("press_name", "unknown"))
    knob = PRESSES[press].knob if press in PRESSES else None
    if knob is None and config.get("threshold") is not None:
        knob = "threshold"
    elif knob is None and press != "no_press":
        knob = "compression_ratio"
    value = config.get(knob) if knob else None
    value = None if value is None else float(value)
    if knob == "compression_ratio" or press == "no_press":
        for record in records:
            if record["compression_ratio"] is None:
                record["compression_ratio"] = value or 0.0
    return KvpressRun(config, records, dataset, press, knob, value)


def import_run(folder: Path, output_dir: Path) -> Path:
    """Turn one kvpress run folder into one of ours under ``output_dir``; returns the folder written."""
    run = load_kvpress_run(folder)
    config, records, dataset, press, knob, value = (run.config, run.records, run.dataset, run.press, run.knob,
                                                     run.value)
    identity = {"imported_from": "kvpress", "source_folder": folder.name, **{k: config.get(k) for k in sorted(config)
                                                                              if k != "output_dir"}}
    target = output_dir / run_folder_name(str(config.get("model", "unknown")), dataset, press, knob, value, identity)
    cache = PredictionCache(target)
    cache.clear()
    for record in records:
        cache.append(record)
    resolved = {"run": {"model": config.get("model"), "dataset": dataset, "data_dir": config.get("data_dir"),
                        "press": config.get("press_init_command") or press, "query_aware": config.get("query_aware"),
                        "imported_from": "kvpress"},
                "press": press, knob or "knob": value, "config": config,
                "environment": {"source": f"kvpress results folder {folder}"}}
    write_text_atomically(target / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=True))
    write_json_atomically(target / METRICS_FILE, score_run(dataset, records))
    return target


def import_kvpress(source: str, output_dir: str = "results/runs") -> list[Path]:
    """Import every kvpress run folder (one holding predictions.csv) found under ``source``."""
    runs = find_runs(source, KVPRESS_PREDICTIONS)
    if not runs:
        raise ConfigError(f"no kvpress runs (folders with {KVPRESS_PREDICTIONS}) under '{source}'")
    return [import_run(folder, Path(output_dir)) for folder in runs]
