"""Provenance that only grows: a run folder's config.yaml keeps its first start and appends every resume, and
metrics.json says which samples it scored.

A run folder is shared by every invocation with the same run id (see ``evaluation.cache.run_id``), and the run id
leaves out settings that only select samples (``--max_samples``, ``--fraction``) or speed (device, threads,
executor). So a rerun with ``--max_samples 5`` resumes a folder that already holds 10 samples: config.yaml then
records that second invocation as a resume (its time and the settings it was given) instead of rewriting the first,
and metrics.json counts and lists the samples it scored, which may be more than the invocation asked for.

config.yaml::

    started: <first start, UTC>          never rewritten (--overwrite starts a run over, provenance included)
    config: {...}                        the first invocation's resolved settings
    environment: {...}                   where it first ran
    resumes:                             one entry per later invocation, appended
      - time: <UTC>
        cached: <samples already in predictions.jsonl>
        flags: {<setting>: <value>}      this invocation's settings that differ from the defaults
        device: <device it ran on>
"""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timezone
from pathlib import Path

import yaml

from evaluation.cache import CONFIG_FILE, write_text_atomically
from evaluation.config import EvalConfig


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def given_flags(config: EvalConfig) -> dict:
    """The settings of ``config`` that differ from the defaults: what the invocation was given (YAML or flags)."""
    defaults = EvalConfig()
    return {item.name: getattr(config, item.name) for item in dataclasses.fields(EvalConfig)
            if getattr(config, item.name) != getattr(defaults, item.name)}


def record_start(folder: Path, resolved: dict, config: EvalConfig, cached: int) -> dict:
    """Write ``folder``/config.yaml for an invocation that starts or resumes the run; returns what was written.

    ``resolved`` is the run's description (run identity, press, point, config, environment). A first start writes it
    with ``started``; a resume keeps the file as it is and appends ``{time, cached, flags, device}`` to ``resumes``.
    """
    path = Path(folder) / CONFIG_FILE
    previous = _read(path) if path.is_file() else None
    if previous is None or config.overwrite:
        document = {**resolved, "started": now(), "resumes": []}
    else:
        document = previous
        document.setdefault("resumes", [])
        document["resumes"].append({"time": now(), "cached": cached, "flags": _plain(given_flags(config)),
                                    "device": resolved.get("environment", {}).get("device")})
    write_text_atomically(path, yaml.safe_dump(_plain(document), sort_keys=True))
    return document


def describe_samples(metrics: dict, scored: list[str], asked: set[str]) -> dict:
    """``metrics`` plus ``samples``: how many and which predictions it scored, and how they relate to what this
    invocation asked for (a cache filled by an earlier, larger invocation holds more)."""
    ids = sorted(scored)
    beyond = sorted(set(ids) - asked)
    return {**metrics, "samples": {
        "n_scored": len(ids), "n_asked": len(asked), "n_beyond_asked": len(beyond),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16], "ids": ids}}


def coverage_note(metrics: dict) -> str:
    """One phrase for the results table when a run scored more samples than the invocation asked for."""
    samples = metrics.get("samples") or {}
    if not samples.get("n_beyond_asked"):
        return ""
    return (f"cache holds {samples['n_scored']} samples, {samples['n_asked']} asked: scored all "
            f"{samples['n_scored']}")


def _read(path: Path) -> dict | None:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return document if isinstance(document, dict) else None


def _plain(value):
    """YAML-safe: tuples as lists, everything else as is (config values are plain already)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
