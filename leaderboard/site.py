"""Render the static site: an index of every (model, dataset) and one page per pair, all assets inside ``out/``.

The output depends only on the results (sorted everywhere, no build date, deterministic SVG), so rebuilding from
the same results gives byte-identical files and a site under version control only changes when results do. Every
string from a result file goes through Jinja2 with autoescaping on and nothing from the results is written into
JavaScript: the one script sorts tables from the rendered cells.
"""

from __future__ import annotations

import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from evaluation.config import ConfigError
from leaderboard.bootstrap import RESAMPLES, SEED, Estimate, estimate, interval, resample_task_scores
from leaderboard.plot import accuracy_compression_svg, accuracy_memory_svg
from leaderboard.ranking import (
    LEVELS,
    NO_LOSS_POINTS,
    TOLERANCE,
    PressSummary,
    Ranking,
    accuracy_at,
    percent_span,
    plotted_runs,
    rank_presses,
    reference_accuracy,
    reference_replicates,
)
from leaderboard.results import MEASURES, Run, read_results

MARKER = ".kvpress-eval-leaderboard"  # marks a folder this module built, so a rebuild may replace it
STATIC = ("style.css", "sort.js")
BEST_SHOWN = 3
HEATMAP_LEVEL = 0.5  # the compression the press x task heatmap compares presses at
NEEDLE_DATASET = "needle_in_haystack"
HEAT_CLASSES = 10  # heatmap cells are coloured by CSS classes h0..h10 (the page's policy forbids inline styles)


@dataclass(frozen=True)
class RunStats:
    """A finished run's scores with their 95% intervals: overall, per task, and the paired delta against no_press."""

    accuracy: Estimate
    tasks: dict[str, Estimate]
    delta: Estimate | None


@dataclass(frozen=True)
class HeatCell:
    """One heatmap cell: a score (None: not reached), its interval where known, and its colour class."""

    value: float | None
    low: float | None = None
    high: float | None = None

    @property
    def heat(self) -> str:
        if self.value is None:
            return "hna"
        return f"h{round(min(max(self.value, 0.0), 100.0) / 100 * HEAT_CLASSES)}"


@dataclass(frozen=True)
class HeatRow:
    label: str
    cells: tuple[HeatCell, ...]


@dataclass(frozen=True)
class Heatmap:
    """A table of coloured scores: ``rows`` by ``columns``, with a caption saying what the axes are."""

    id: str
    title: str
    row_header: str
    columns: tuple[str, ...]
    rows: tuple[HeatRow, ...]


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
    stats: dict[str, RunStats]  # run name -> its scores with intervals (finished runs)
    reference_replicates: np.ndarray | None = field(default=None, compare=False, repr=False)

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

    @property
    def measured(self) -> bool:
        """Whether any finished run recorded a memory or speed field."""
        return any(run.measure(field) is not None for run in self.finished for field in MEASURES)

    @property
    def device_measured(self) -> bool:
        """Whether any finished run recorded the CUDA allocator's peak (its own column)."""
        return any(run.device_peak is not None for run in self.finished)

    def task_heatmap(self, level: float = HEATMAP_LEVEL) -> Heatmap | None:
        """Press x task at achieved compression ``level``: each press's task score interpolated on its own points
        (as accuracy at a level), ``no_press`` first; None without tasks or presses."""
        tasks = self.tasks
        if not tasks or not self.ranking:
            return None
        rows = []
        references = [run for run in self.finished if run.is_reference]
        if references:
            rows.append(HeatRow("no_press", tuple(self._mean_cell(references, task) for task in tasks)))
        for summary in self.ranking:
            members = [run for run in plotted_runs(self.runs) if run.label == summary.label]
            cells = []
            for task in tasks:
                points = [(run.compression, task_score(run, task)) for run in members]
                points = [(c, a) for c, a in points if isinstance(a, (int, float))]
                value = accuracy_at(points, level) if points else None
                lows = [(run.compression, self.stats[run.name].tasks.get(task)) for run in members]
                bounds = [(c, e) for c, e in lows if e is not None and e.has_interval]
                low = high = None
                if value is not None and len(bounds) == len(points):
                    low = accuracy_at([(c, e.low) for c, e in bounds], level)
                    high = accuracy_at([(c, e.high) for c, e in bounds], level)
                cells.append(HeatCell(value, low, high))
            rows.append(HeatRow(summary.label, tuple(cells)))
        return Heatmap("task-heatmap", f"Accuracy per task at {100 * level:g}% achieved compression", "press",
                       tuple(tasks), tuple(rows))

    def _mean_cell(self, runs: list[Run], task: str) -> HeatCell:
        estimates = [self.stats[run.name].tasks.get(task) for run in runs]
        if len(runs) == 1 and estimates[0] is not None:
            return HeatCell(estimates[0].value, estimates[0].low, estimates[0].high)
        values = [task_score(run, task) for run in runs]
        values = [v for v in values if isinstance(v, (int, float))]
        return HeatCell(sum(values) / len(values) if values else None)

    def needle_heatmaps(self) -> tuple[Heatmap, ...]:
        """Depth x length score grids of the needle-in-a-haystack runs that carry ``by_length_depth``."""
        if self.dataset != NEEDLE_DATASET:
            return ()
        maps = []
        for index, run in enumerate(run for run in self.finished if run.by_length_depth):
            grid: dict[tuple[float, float], list[float]] = {}
            for cell in run.by_length_depth:
                grid.setdefault((float(cell["depth"]), int(cell["length"])), []).append(float(cell["score"]))
            depths = sorted({depth for depth, _ in grid})
            lengths = sorted({length for _, length in grid})
            # depth in percent of the context, as the datasets issue's --needle_depths gives it
            rows = tuple(HeatRow(f"{d:g}%",
                                 tuple(HeatCell(_mean(grid[d, n]) if (d, n) in grid else None) for n in lengths))
                         for d in depths)
            maps.append(Heatmap(f"needle-{index}", f"{run.label} · {run.point}", "depth",
                                tuple(f"{n:,}" for n in lengths), rows))
        return tuple(maps)


def build_site(results: str | Path | list, out: str | Path, heatmap_level: float = HEATMAP_LEVEL) -> Path:
    """Render the leaderboard of every run under ``results`` into ``out``; returns the index page's path.

    ``heatmap_level`` is the achieved compression the press x task heatmap compares presses at. ``out`` must be new,
    empty, or a site built here before (which is replaced whole, so runs removed from results
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
               "tolerance": TOLERANCE, "resamples": RESAMPLES, "seed": SEED, "no_loss_points": NO_LOSS_POINTS,
               "heatmap_level": heatmap_level,
               "run_slugs": {run.name: slug for run, slug in zip(data.runs, run_slugs, strict=True)}}

    for name in STATIC:
        _write(out / "assets" / name, (Path(__file__).parent / "static" / name).read_text())
    for run, slug in zip(data.runs, run_slugs, strict=True):
        for file in run.files:
            (out / "runs" / slug).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, out / "runs" / slug / file.name)
    for pair in pairs:
        plot = memory_plot = None
        if pair.ranking:
            lines = [(summary.label, summary.points, summary.point_intervals) for summary in pair.ranking]
            plot = f"plots/{pair.slug}.svg"  # legend in rank order
            band = (pair.ranked.start, pair.ranked.end) if pair.ranked.scored else None
            reference = None if pair.reference is None else _reference_estimate(pair)
            _write(out / plot, accuracy_compression_svg(lines, reference, band))
        memory_lines = _memory_lines(pair)
        if memory_lines:
            memory_plot = f"plots/{pair.slug}__memory.svg"
            _write(out / memory_plot, accuracy_memory_svg(memory_lines))
        page = environment.get_template("pair.html").render(
            root="../", pair=pair, plot=plot, memory_plot=memory_plot, task_map=pair.task_heatmap(heatmap_level),
            needles=pair.needle_heatmaps(), **context)
        _write(out / "pairs" / f"{pair.slug}.html", page)
    index = out / "index.html"
    _write(index, environment.get_template("index.html").render(
        root="", pairs=pairs, skipped=data.skipped, n_pending=sum(len(pair.pending) for pair in pairs),
        summaries=model_summaries(pairs), **context))
    return index


@dataclass(frozen=True)
class PressOverall:
    """One press across one model's datasets: mean rank, mean AUC / no_press accuracy, datasets behind them."""

    label: str
    mean_rank: float
    mean_normalised_auc: Estimate | None  # a fraction, with the interval of the replicate-wise mean
    n_datasets: int
    n_normalised: int


@dataclass(frozen=True)
class ModelSummary:
    model: str
    n_datasets: int
    presses: tuple[PressOverall, ...]


def model_summaries(pairs: list[Pair]) -> tuple[ModelSummary, ...]:
    """Per model, each ranked press's mean rank and mean normalised AUC (AUC / no_press accuracy, on datasets with a
    reference) over the model's datasets where it is ranked; best mean rank first."""
    models: dict[str, list[Pair]] = {}
    for pair in pairs:
        models.setdefault(pair.model, []).append(pair)
    summaries = []
    for model in sorted(models):
        ranks: dict[str, list[int]] = {}
        normalised: dict[str, list[tuple[float, np.ndarray | None]]] = {}
        for pair in models[model]:
            for summary in pair.ranking:
                if summary.rank:
                    ranks.setdefault(summary.label, []).append(summary.rank)
                    if pair.reference:
                        replicates = (None if summary.auc_replicates is None or pair.reference_replicates is None
                                      else summary.auc_replicates / pair.reference_replicates)
                        normalised.setdefault(summary.label, []).append((summary.auc / pair.reference, replicates))
        presses = [PressOverall(label, sum(r) / len(r), _mean_estimate(normalised.get(label, [])), len(r),
                                len(normalised.get(label, ()))) for label, r in ranks.items()]
        presses.sort(key=lambda p: (p.mean_rank, -(p.mean_normalised_auc.value if p.mean_normalised_auc else 0.0),
                                    p.label))
        summaries.append(ModelSummary(model, len(models[model]), tuple(presses)))
    return tuple(summaries)


def _mean_estimate(values: list[tuple[float, np.ndarray | None]]) -> Estimate | None:
    """The mean of per-dataset values, with the interval of the replicate-wise mean where every one has replicates
    (the datasets were resampled independently)."""
    if not values:
        return None
    mean = sum(value for value, _ in values) / len(values)
    if any(replicates is None for _, replicates in values):
        return Estimate(mean)
    bounds = interval(sum(replicates for _, replicates in values) / len(values))
    return Estimate(mean) if bounds is None else Estimate(mean, *bounds)


def _reference_estimate(pair: Pair) -> Estimate:
    references = [pair.stats[run.name].accuracy for run in pair.finished if run.is_reference]
    if len(references) == 1:
        return references[0]
    return Estimate(pair.reference)


def _memory_lines(pair: Pair) -> list[tuple[str, list[tuple[float, float, tuple[float, float] | None]]]]:
    """(label, [(KV bytes held, accuracy, its interval)]) per press line, no_press included, for runs that measured
    their KV bytes; empty when none did."""
    lines: dict[str, list] = {}
    for run in pair.finished:
        held = run.measure("kv_bytes_held")
        if run.is_reference and held is None:
            held = run.measure("kv_bytes_dense")
        if held is None:
            continue
        accuracy = pair.stats[run.name].accuracy
        lines.setdefault(run.label, []).append(
            (held, run.accuracy, (accuracy.low, accuracy.high) if accuracy.has_interval else None))
    return [(label, sorted(points, key=lambda p: p[0])) for label, points in lines.items()]


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
        # a seed of its own per page (derived from SEED and the page), so pages resample independently and the
        # cross-dataset means on the index can average their replicates
        stats, replicates = _run_stats(members, SEED + zlib.crc32(slug.encode()))
        ranked = rank_presses(members, replicates)
        pairs.append(Pair(key[0], key[1], key[2] or None, slug, members, ranked, reference_accuracy(members), stats,
                          reference_replicates(members, replicates)))
    return pairs


def _run_stats(runs: tuple[Run, ...], seed: int) -> tuple[dict[str, RunStats], dict]:
    """Each finished run's scores with intervals, from one paired bootstrap of the page; and the accuracy
    replicates (run name -> array) the ranking reuses. Replicates are centred on the scores metrics.json reports."""
    finished = [run for run in runs if run.metrics is not None]
    by_task, observed = resample_task_scores({run.name: run.samples for run in finished}, seed=seed)
    accuracies, task_estimates = {}, {}
    for run in finished:
        tasks = by_task.get(run.name, {})
        centred = {}
        for task, values in tasks.items():
            shown = task_score(run, task)
            centred[task] = values + (shown - observed[run.name][task] if _is_score(shown) else 0.0)
        task_estimates[run.name] = {task: estimate(task_score(run, task), values) for task, values in centred.items()
                                    if _is_score(task_score(run, task))}
        if tasks:
            accuracies[run.name] = (sum(tasks.values()) / len(tasks) + run.accuracy
                                    - sum(observed[run.name].values()) / len(tasks))
    reference = [run for run in finished if run.is_reference]
    reference_rep = (sum(accuracies[run.name] for run in reference) / len(reference)
                     if reference and all(run.name in accuracies for run in reference) else None)
    reference_value = reference_accuracy(runs)
    stats = {}
    for run in finished:
        delta = None
        if reference_value is not None and not run.is_reference:
            delta = estimate(run.accuracy - reference_value, None if reference_rep is None or run.name not in
                             accuracies else accuracies[run.name] - reference_rep)
        stats[run.name] = RunStats(estimate(run.accuracy, accuracies.get(run.name)), task_estimates[run.name], delta)
    return stats, accuracies


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _is_score(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    environment.filters.update(number=_number, bytes=_bytes, rate=_rate, percent=_percent, span=percent_span,
                               sort_key=_sort_key, yaml=_yaml,
                               clip=_clip, answers=_answers)
    environment.globals.update(task_score=task_score, plain=Estimate)
    return environment


def _number(value: object, digits: int = 2, signed: bool = False) -> str:
    """A score for display ('+' before positive ones when ``signed``, a true minus sign before negative ones); '-'
    for no value, anything unexpected shown as text (it is escaped like all text)."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if abs(value) < 0.5 * 10**-digits:  # a bound a float error below 0 would print "-0.0"
            value = 0.0
        text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
        return text.replace("-", "\u2212") if signed else text
    return str(value)


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return "-"
    return f"{100 * fraction:.1f}%".replace("-0.0%", "0.0%")  # a float error below 0 is no sign


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
