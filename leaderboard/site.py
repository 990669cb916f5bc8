"""Render the static site: an index of every (model, dataset) and one page per pair, all assets inside ``out/``.

The output depends only on the results (sorted everywhere, no build date, deterministic SVG), so rebuilding from
the same results gives byte-identical files and a site under version control only changes when results do. Every
string from a result file goes through Jinja2 with autoescaping on and nothing from the results is written into
JavaScript: the one script sorts tables from the rendered cells.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from evaluation.config import ConfigError
from leaderboard.plot import accuracy_compression_svg
from leaderboard.ranking import (
    LEVELS,
    TOLERANCE,
    PressSummary,
    Ranking,
    percent_span,
    plotted_runs,
    rank_presses,
    reference_accuracy,
)
from leaderboard.results import Run, read_results

MARKER = ".kvpress-eval-leaderboard"  # marks a folder this module built, so a rebuild may replace it
STATIC = ("style.css", "sort.js")
BEST_SHOWN = 3


@dataclass(frozen=True)
class Pair:
    """One (model, dataset) page: its runs, the presses ranked over their common compression range (``ranked``), and
    the file name (``slug``) of its page and plot."""

    model: str
    dataset: str
    data_dir: str | None
    slug: str
    runs: tuple[Run, ...]
    ranked: Ranking
    reference: float | None

    @property
    def ranking(self) -> tuple[PressSummary, ...]:
        return self.ranked.presses

    @property
    def dataset_label(self) -> str:
        return self.dataset if self.data_dir is None else f"{self.dataset} ({self.data_dir})"

    @property
    def finished(self) -> tuple[Run, ...]:
        return tuple(run for run in self.runs if run.metrics is not None)

    @property
    def pending(self) -> tuple[Run, ...]:
        return tuple(run for run in self.runs if run.metrics is None)

    @property
    def unplottable(self) -> tuple[Run, ...]:
        """Finished press runs without an achieved compression: listed, not plotted."""
        plotted = plotted_runs(self.runs)
        return tuple(r for r in self.finished if not r.is_reference and r not in plotted)

    @property
    def tasks(self) -> list[str]:
        return sorted({task for run in self.finished for task in run.metrics.get("per_task", {})})

    def task_metric(self, task: str) -> str:
        """The headline metric of ``task`` (the per-task table's unit), from the first run that scored it."""
        names = (run.metrics.get("metric", {}).get(task) for run in self.finished)
        return next((str(name) for name in names if name is not None), "")

    @property
    def best(self) -> tuple[PressSummary, ...]:
        return tuple(summary for summary in self.ranking if summary.rank)[:BEST_SHOWN]


def build_site(results: str | Path | list, out: str | Path) -> Path:
    """Render the leaderboard of every run under ``results`` into ``out``; returns the index page's path.

    ``out`` must be new, empty, or a site built here before (which is replaced whole, so runs removed from results
    disappear from the site). An empty results folder, unfinished runs and unreadable folders give pages with a
    notice; a missing results folder or an ``out`` holding other files raises :class:`ConfigError`. Several results
    folders (a sweep's shards) are read as one.
    """
    roots = [Path(r) for r in results] if isinstance(results, (list, tuple)) else [Path(results)]
    out = Path(out)
    for root in roots:
        _check_results(root, out)
    _prepare_output(roots[0], out)
    sites = [marker.parent for root in roots for marker in root.rglob(MARKER)]  # ours, inside results: no runs
    data = read_results(roots, exclude=[out, *sites])
    pairs = _pairs(data.runs)
    run_slugs = _unique_slugs(run.name for run in data.runs)
    environment = _environment()
    context = {"results_name": ", ".join(root.resolve().name for root in roots), "levels": LEVELS,
               "tolerance": TOLERANCE,
               "run_slugs": {run.name: slug for run, slug in zip(data.runs, run_slugs, strict=True)}}

    for name in STATIC:
        _write(out / "assets" / name, (Path(__file__).parent / "static" / name).read_text())
    for run, slug in zip(data.runs, run_slugs, strict=True):
        for file in run.files:
            (out / "runs" / slug).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out / "runs" / slug / file.name)
    for pair in pairs:
        plot = None
        if pair.ranking:
            lines = [(summary.label, summary.points) for summary in pair.ranking]  # legend in rank order
            plot = f"plots/{pair.slug}.svg"
            band = (pair.ranked.start, pair.ranked.end) if pair.ranked.scored else None
            _write(out / plot, accuracy_compression_svg(lines, pair.reference, band))
        page = environment.get_template("pair.html").render(root="../", pair=pair, plot=plot, **context)
        _write(out / "pairs" / f"{pair.slug}.html", page)
    index = out / "index.html"
    _write(index, environment.get_template("index.html").render(
        root="", pairs=pairs, skipped=data.skipped, n_pending=sum(len(pair.pending) for pair in pairs), **context))
    return index


def task_score(run: Run, task: str) -> object:
    """``run``'s headline score on ``task``; None where it has none."""
    scores = run.metrics.get("per_task", {}).get(task) if run.metrics else None
    metric = run.metrics.get("metric", {}).get(task) if run.metrics else None
    return scores.get(metric) if isinstance(scores, dict) and isinstance(metric, str) else None


def _check_results(results: Path, out: Path) -> None:
    if not results.is_dir():
        raise ConfigError(f"'{results}' is not a folder of results: check the path given to --results")
    if results.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out '{out}' holds the results folder: choose a folder of its own for the site")


def _prepare_output(results: Path, out: Path) -> None:
    _check_results(results, out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out '{out}' is a file: give a folder for the site")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise ConfigError(f"--out '{out}' already holds files that are not a leaderboard: choose a new or "
                                  "empty folder")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / MARKER, "Built by kvpress-eval leaderboard; rebuilding replaces this whole folder.\n")


def _pairs(runs: tuple[Run, ...]) -> list[Pair]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.dataset, run.data_dir or ""), []).append(run)
    keys = sorted(groups)
    slugs = _unique_slugs("__".join(part for part in key if part) for key in keys)
    pairs = []
    for key, slug in zip(keys, slugs, strict=True):
        members = tuple(sorted(groups[key], key=_run_order))
        pairs.append(Pair(key[0], key[1], key[2] or None, slug, members, rank_presses(members),
                          reference_accuracy(members)))
    return pairs


def _run_order(run: Run) -> tuple:
    """Reference first, then by press line and achieved compression; unfinished runs after finished ones."""
    compression = run.compression
    return (not run.is_reference, run.label, compression is None, compression or 0.0, run.name)


def _unique_slugs(names) -> list[str]:
    """File-name-safe, distinct names in the order given (a clash gets ``-2``, ``-3``...)."""
    slugs, seen = [], set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._")[:80] or "run"
        slug, number = base, 1
        while slug.lower() in seen:  # case-insensitive: the site may be copied to a case-insensitive disk
            number += 1
            slug = f"{base}-{number}"
        seen.add(slug.lower())
        slugs.append(slug)
    return slugs


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("leaderboard", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)
    environment.filters.update(number=_number, percent=_percent, span=percent_span, sort_key=_sort_key, yaml=_yaml,
                               clip=_clip, answers=_answers)
    environment.globals["task_score"] = task_score
    return environment


def _number(value: object, digits: int = 2) -> str:
    """A score for display; '-' for no value, anything unexpected shown as text (it is escaped like all text)."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _sort_key(value: object) -> str:
    """What the sort script compares (``data-sort``): full-precision numbers; empty for no value (sorted last)."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


def _yaml(value: object) -> str:
    return yaml.safe_dump(value, sort_keys=True, allow_unicode=True, default_flow_style=False)


def _answers(answer: object) -> str:
    """Reference answers: a list shown as ``a | b``."""
    return " | ".join(map(str, answer)) if isinstance(answer, list) else "" if answer is None else str(answer)


def _clip(text: object, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
