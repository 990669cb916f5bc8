"""The predictions cache: one folder per run, one JSON line per finished sample, so a sweep never loses work.

::

    results/
      <model>__<dataset>__<press>__<knob>=<value>__<run id>/
        config.yaml         the resolved run (everything in the run id, plus the environment)
        predictions.jsonl   one JSON object per finished sample, appended and flushed as each one finishes
        metrics.json        derived from predictions.jsonl; can always be recomputed

The run id is a hash of exactly what changes a run's predictions (:func:`run_id`). A rerun of the same run opens the
same folder and skips the samples already in ``predictions.jsonl``. Each line is written with a single ``write`` of
the whole line, flushed and fsynced: a process killed at any moment leaves at most one incomplete last line, which
:meth:`PredictionCache.load` detects and cuts off (the sample in flight is simply redone). A malformed line anywhere
else is never silently trusted: it raises :class:`CacheError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


class CacheError(RuntimeError):
    """A results folder that cannot be trusted; the message names the file and the fix."""


def run_id(identity: dict) -> str:
    """12 hex digits of the SHA-256 of ``identity`` as canonical JSON (sorted keys, no whitespace).

    ``identity`` must hold exactly what changes predictions: model (name and revision), dataset and its parameters,
    press and its parameters, generation settings, prompt protocol, dtype and seed. It deliberately leaves out the
    device, the attention implementation and batch/progress settings: they change speed, not the computation (up to
    floating-point noise), so a run moved from one GPU to another resumes instead of starting over.
    """
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    """A file-name-safe version of ``text`` (model paths and hub names become ``org--name``)."""
    text = str(text).rstrip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:80]


def run_folder_name(model: str, dataset: str, press: str, knob: str | None, value, identity: dict) -> str:
    """Readable and unique: ``<model>__<dataset>__<press>__<knob>=<value>__<run id>``."""
    point = f"{knob}={value}" if knob else "default"
    model_name = Path(model).name if Path(model).exists() else model
    parts = [_slug(model_name), _slug(dataset), _slug(press), _slug(point), run_id(identity)]
    return "__".join(parts)


class PredictionCache:
    """Append-only JSON-lines store of one run's predictions, keyed by ``sample_id``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / PREDICTIONS_FILE

    def load(self) -> dict[str, dict]:
        """Finished predictions by sample id, after cutting off an incomplete last line (a killed write).

        Raises :class:`CacheError` for a malformed line that is not the last one, or a record without
        ``sample_id``. A sample id seen twice keeps its first record (a duplicate can only come from a hand edit).
        """
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # a well-formed file ends with "\n", so tail is b""
        records: dict[str, dict] = {}
        for number, line in enumerate(complete, start=1):
            record = self._parse(line, number, is_last=(number == len(complete) and not tail))
            if record is None:  # a corrupt last line: drop it
                self._truncate(len(data) - len(line) - 1, number)
                return records
            if record["sample_id"] in records:
                logger.warning("%s: sample %s appears twice; keeping the first", self.path, record["sample_id"])
                continue
            records[record["sample_id"]] = record
        if tail:  # the last line has no newline: the write was interrupted
            if self._parse(tail, len(complete) + 1, is_last=True) is not None:
                logger.warning("%s: last line was complete but unterminated; redoing that sample", self.path)
            self._truncate(len(data) - len(tail), len(complete) + 1)
        return records

    def _parse(self, line: bytes, number: int, is_last: bool) -> dict | None:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "sample_id" not in record:
                raise ValueError("no sample_id")
            return record
        except ValueError:
            if is_last:
                return None
            raise CacheError(
                f"{self.path}: line {number} is not a prediction record; the cache was edited or damaged: "
                "rerun with --overwrite to start this run over"
            ) from None

    def _truncate(self, size: int, line_number: int) -> None:
        logger.warning("%s: cutting off the incomplete line %d (a write was interrupted)", self.path, line_number)
        with self.path.open("r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict) -> None:
        """Add one finished prediction; durable once this returns."""
        if "sample_id" not in record:
            raise ValueError("a prediction record needs a sample_id")
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def clear(self) -> None:
        """Start over (``--overwrite``): remove the predictions and the metrics derived from them."""
        for name in (PREDICTIONS_FILE, METRICS_FILE):
            (self.folder / name).unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomically(path: str | Path, payload: dict) -> None:
    """``payload`` as indented JSON with sorted keys, written atomically."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
