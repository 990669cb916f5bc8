"""The leaderboard site, built from results folders written here by hand, read as files and in headless Chromium."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from evaluation.config import ConfigError
from leaderboard import build_site
from leaderboard.bootstrap import interval, resample_accuracies
from leaderboard.ranking import (
    Ranking,
    accuracy_at,
    common_range,
    curve,
    has_curve,
    mean_accuracy,
    percent_span,
    rank_presses,
    scored_curve,
)
from leaderboard.results import read_results

MODEL = "org/tiny-model"
TASK_SCORES = {"niah_single_1": 7.0, "vt": -7.0}  # per-task score = the run's accuracy + this offset
HOSTILE = "<script>window.pwned=1;alert(\"x\")</script>\"'"
HOSTILE_PRESS = "<img src=x onerror=\"window.pwned=2\">"
HOSTILE_PREDICTION = "</td></tr></table><script>window.pwned=3</script><b>\"quoted\" 'answer'"


def write_run(results: Path, folder: str, press: str, value: float | None, accuracy: float, compression: float,
              model: str = MODEL, finished: bool = True, task_scores: dict | None = None,
              predictions: list[dict] | None = None) -> Path:
    """A run folder as kvpress-eval writes it: config.yaml, predictions.jsonl and (when finished) metrics.json."""
    knob = None if press == "no_press" else "threshold" if press.startswith("kvzap") else "compression_ratio"
    path = results / folder
    path.mkdir(parents=True)
    generation = {"max_new_tokens": 16, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                  "min_p": 0.0, "seed": 0}
    config = {"run": {"model": model, "model_revision": "abc123", "dataset": "ruler", "data_dir": None,
                      "press": f"Press({knob}={value})", "generation": generation, "query_aware": False,
                      "ruler_length": 1024, "max_context_length": None},
              "press": press, knob or "knob": value, "config": {"model": model, "press": [press]},
              "environment": {"torch": "2.13.0", "device": "cpu", "dtype": "torch.float32",
                              "attn_implementation": "sdpa"},
              "started": "2025-06-01T12:00:00+00:00"}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    scores = task_scores or {task: accuracy + offset for task, offset in TASK_SCORES.items()}
    predictions = predictions or [{"sample_id": f"{task}-0", "task": task, "question": "What is the number?",
                                   "answer": ["42"], "prediction": "42", "compression_ratio": compression}
                                  for task in scores]
    (path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    if finished:
        metrics = {"dataset": "ruler", "per_task": {task: {"string_match_all": s} for task, s in scores.items()},
                   "metric": {task: "string_match_all" for task in scores}, "overall": accuracy,
                   "compression_ratio": compression, "n_predictions": len(predictions),
                   "n_samples": len(predictions), "style": "ruler", "versions": {}}
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def write_kvpress_run(results: Path, folder: str) -> Path:
    """A kvpress run folder (predictions.csv + config.yaml): 1 of 2 niah answers right, 1 of 1 vt."""
    path = results / folder
    path.mkdir(parents=True)
    config = {"dataset": "ruler", "data_dir": None, "model": MODEL, "press_name": "knorm", "compression_ratio": 0.5,
              "threshold": None, "max_new_tokens": 16, "query_aware": False}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "predictions.csv").write_text(
        "task,question,answer,predicted_answer,compression_ratio\n"
        "niah_single_1,q,['42'],42,0.5\nniah_single_1,q,['7'],8,0.5\nvt,q,['x y'],x y,0.5\n")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """knorm dominates snapkv at every level; kvzap has one finished point and one pending run; a kvpress knorm
    run sits beside ours; a second model has hostile names, task and prediction."""
    root = tmp_path_factory.mktemp("results")
    write_run(root, "tiny__ruler__no_press__default__0", "no_press", None, 80.0, 0.0)
    for i, (ratio, knorm, snapkv) in enumerate([(0.25, 78.0, 60.0), (0.5, 75.0, 50.0), (0.75, 70.0, 30.0)]):
        write_run(root, f"tiny__ruler__knorm__{i}", "knorm", ratio, knorm, ratio)
        write_run(root, f"tiny__ruler__snapkv__{i}", "snapkv", ratio, snapkv, ratio)
    write_run(root, "tiny__ruler__kvzap_mlp__0", "kvzap_mlp", -4.0, 72.0, 0.5)
    write_run(root, "tiny__ruler__kvzap_mlp__1", "kvzap_mlp", -3.0, 70.0, 0.6, finished=False)
    write_kvpress_run(root, "kvpress/ruler__org--tiny-model__knorm__0.50")
    hostile = [{"sample_id": "h-0", "task": HOSTILE, "question": HOSTILE, "answer": [HOSTILE],
                "prediction": HOSTILE_PREDICTION, "compression_ratio": 0.5}]
    write_run(root, "hostile <b>\"'", HOSTILE_PRESS, 0.5, 10.0, 0.5, model=HOSTILE + "model",
              task_scores={HOSTILE: 10.0}, predictions=hostile)
    # a third model measured for memory and speed, with a press named too long for a cell, and a needle run
    right = [i % 3 != 0 for i in range(30)]
    add_metrics(write_run(root, "m__no_press", "no_press", None, 66.67, 0.0, model=MEASURED_MODEL,
                          task_scores={"niah_single_1": 66.67}, predictions=answered(right)), **MEASURED)
    add_metrics(write_run(root, "m__long", LONG_PRESS, 0.5, 63.33, 0.5, model=MEASURED_MODEL,
                          task_scores={"niah_single_1": 63.33}, predictions=answered([ok and i != 1 for i, ok in
                                                                                      enumerate(right)])), **MEASURED)
    needle = write_run(root, "m__needle", "knorm", 0.5, 60.0, 0.5, model=MEASURED_MODEL)
    set_dataset(needle, "needle_in_haystack")
    add_metrics(needle, dataset="needle_in_haystack", by_length_depth=NEEDLE_GRID)
    return root


MEASURED_MODEL = "org/measured"
LONG_PRESS = "a_press_with_a_registry_name_far_too_long_for_a_cell"
NEEDLE_GRID = [{"length": length, "depth": depth, "score": score, "exact": score, "n": 2}
               for length, depth, score in [(512, 0.0, 100.0), (512, 50.0, 50.0), (1024, 0.0, 90.0),
                                            (1024, 50.0, 0.0)]]


def set_dataset(folder: Path, dataset: str) -> None:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["run"]["dataset"] = dataset
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def site(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    assert build_site(results, out) == out / "index.html"
    return out


def pages(site: Path) -> dict[str, str]:
    return {path.relative_to(site).as_posix(): path.read_text() for path in sorted(site.rglob("*.html"))}


def pair_page(site: Path, model: str, dataset: str = "ruler") -> str:
    return next(text for name, text in pages(site).items()
                if name.startswith("pairs/") and f"<h1>{model} <span class=\"sep\">·</span> {dataset}</h1>" in text)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    """The text of each body cell (row headers included) of table ``table_id``."""
    body = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def ranked(results: Path) -> Ranking:
    """The ranking of MODEL's runs under ``results``, as its page shows it."""
    return rank_presses([run for run in read_results(results).runs if run.model == MODEL])


def value(cell: str) -> str:
    """A score cell's number, without the interval beneath it."""
    return cell.split(" [")[0]


def auc_column(page: str) -> dict[str, str]:
    """press -> (rank, AUC) from a page's ranking table."""
    return {row[1]: (row[0], value(row[2])) for row in table_rows(page, "ranking")}


def test_curves_and_matched_levels_follow_their_definitions():
    assert curve([(0.5, 60.0), (0.25, 70.0), (0.5, 50.0)]) == [(0.25, 70.0), (0.5, 55.0)]
    assert scored_curve([(0.5, 60.0), (1.2, 40.0)], reference=80.0) == [(0.0, 80.0), (0.5, 60.0), (1.0, 40.0)]
    assert has_curve([(0.5, 60.0)], reference=80.0) and not has_curve([(0.5, 60.0), (0.5, 70.0)], reference=None)
    points = [(0.2, 70.0), (0.6, 50.0)]
    assert accuracy_at(points, 0.5) == pytest.approx(55.0)
    assert accuracy_at(points, 0.75) is None and accuracy_at(points, 0.1) is None
    assert accuracy_at([(0.499, 70.0), (0.749, 60.0)], 0.75) == 60.0  # achieved a hair under the requested 0.75
    assert percent_span(0.0, 0.5) == "0–50%" and percent_span(0.25, 0.749) == "25–74.9%"


def test_auc_is_the_mean_accuracy_over_the_common_range():
    # one press alone: c* is its own measured-to, 0.5. Area 0-0.25: (80+70)/2*0.25 = 18.75; 0.25-0.5: (70+60)/2*0.25
    # = 16.25; (18.75 + 16.25) / 0.5 = 70
    assert common_range([[(0.25, 70.0), (0.5, 60.0)]], reference=80.0) == (0.0, 0.5)
    assert mean_accuracy([(0.25, 70.0), (0.5, 60.0)], 80.0, 0.0, 0.5) == pytest.approx(70.0)
    # interpolated at c* = 0.5 between (0.25, 70) and (0.75, 50): 60. (18.75 + (70+60)/2*0.25) / 0.5 = 70
    assert mean_accuracy([(0.25, 70.0), (0.75, 50.0)], 80.0, 0.0, 0.5) == pytest.approx(70.0)
    # a single point with the reference: (80+60)/2 over [0, 0.5] = 70, the same as the area (35) / 0.5
    assert mean_accuracy([(0.5, 60.0)], 80.0, 0.0, 0.5) == pytest.approx(70.0)
    # c* = 0 (a press measured only at 0): an empty range, no AUC rather than a division by zero
    assert common_range([[(0.0, 79.0)], [(0.5, 70.0)]], reference=80.0) == (0.0, 0.0)
    assert mean_accuracy([(0.5, 70.0)], 80.0, 0.0, 0.0) is None
    # no reference: the range is [largest first point, smallest last point] = [0.3, 0.6]; a lone point has no curve
    far = [(0.3, 60.0), (0.5, 40.0), (0.8, 30.0)]
    assert common_range([[(0.2, 70.0), (0.6, 50.0)], far, [(0.4, 90.0)]], reference=None) == (0.3, 0.6)
    # (0.2, 70)-(0.6, 50) at 0.3: 65; mean of the straight line over [0.3, 0.6]: (65 + 50) / 2 = 57.5
    assert mean_accuracy([(0.2, 70.0), (0.6, 50.0)], None, 0.3, 0.6) == pytest.approx(57.5)
    # at 0.6 between (0.5, 40) and (0.8, 30): 36.667; ((60+40)/2*0.2 + (40+36.667)/2*0.1) / 0.3 = 13.8333 / 0.3
    assert mean_accuracy(far, None, 0.3, 0.6) == pytest.approx(13.8333333 / 0.3)
    assert mean_accuracy([(0.4, 90.0)], None, 0.3, 0.6) is None
    # no reference, ranges that do not overlap: c0 = 0.5 > c* = 0.3, no AUC for anyone
    assert common_range([[(0.1, 70.0), (0.3, 60.0)], [(0.5, 50.0), (0.7, 40.0)]], reference=None) == (0.5, 0.3)
    assert mean_accuracy([(0.1, 70.0), (0.3, 60.0)], None, 0.5, 0.3) is None


def test_a_press_measured_further_gains_nothing_from_it(tmp_path):
    """"far" is worse than "near" where both were measured (70 against 76 at 50%) but was also measured at 90%. By the
    old area to each press's own end it ranked first: far 37.5 + (70+60)/2*0.4 = 63.5, near (80+76)/2*0.5 = 39. Over
    the common range [0, c* = 0.5]: far (80+70)/2 = 75, near (80+76)/2 = 78, so near ranks first."""
    write_run(tmp_path, "r__no_press", "no_press", None, 80.0, 0.0)
    write_run(tmp_path, "r__far__0", "far", 0.5, 70.0, 0.5)
    write_run(tmp_path, "r__far__1", "far", 0.9, 60.0, 0.9)
    write_run(tmp_path, "r__near__0", "near", 0.5, 76.0, 0.5)
    ranking = ranked(tmp_path)
    assert (ranking.start, ranking.end, ranking.set_by) == (0.0, 0.5, ("near",))
    assert [(p.rank, p.label, p.measured_to) for p in ranking.presses] == [(1, "near", 0.5), (2, "far", 0.9)]
    assert [p.auc for p in ranking.presses] == [pytest.approx(78.0), pytest.approx(75.0)]
    page = pair_page(build_site(tmp_path, tmp_path / "site").parent, MODEL)
    assert "AUC (mean acc. 0–50%)" in page and "here 50.0%, set by near" in page
    assert auc_column(page) == {"near": ("1", "78.00"), "far": ("2", "75.00")}
    assert "The shaded band is the common compression range, 0–50%" in " ".join(page.split())  # plot caption


def test_without_a_reference_presses_share_the_overlap_of_their_ranges(tmp_path):
    # numbers as in test_auc_is_the_mean_accuracy_over_the_common_range: range [0.3, 0.6], 57.5 and 46.11
    for i, (compression, accuracy) in enumerate([(0.2, 70.0), (0.6, 50.0)]):
        write_run(tmp_path, f"r__knorm__{i}", "knorm", compression, accuracy, compression)
    for i, (compression, accuracy) in enumerate([(0.3, 60.0), (0.5, 40.0), (0.8, 30.0)]):
        write_run(tmp_path, f"r__snapkv__{i}", "snapkv", compression, accuracy, compression)
    write_run(tmp_path, "r__tova__0", "tova", 0.4, 90.0, 0.4)  # one point, no reference: no curve, unranked
    write_run(tmp_path, "other__tova__0", "tova", 0.4, 90.0, 0.4, model="org/other")  # alone on its page
    for press, points in (("knorm", [(0.1, 70.0), (0.3, 50.0)]), ("snapkv", [(0.5, 60.0), (0.8, 30.0)])):
        for i, (compression, accuracy) in enumerate(points):  # ranges [0.1, 0.3] and [0.5, 0.8] do not overlap
            write_run(tmp_path, f"gap__{press}__{i}", press, compression, accuracy, compression, model="org/gap")
    ranking = ranked(tmp_path)
    assert (ranking.start, ranking.end, ranking.set_by) == (0.3, 0.6, ("knorm",))
    site = build_site(tmp_path, tmp_path / "site").parent
    assert 'id="no-curve"' in pair_page(site, "org/other")  # no press with a curve: no range at all
    gap = pair_page(site, "org/gap")
    assert ("the latest first point is at 50.0% compression and the earliest last point (c*, knorm) at 30.0%"
            in " ".join(gap.split()))
    assert auc_column(gap) == {"knorm": ("-", "-"), "snapkv": ("-", "-")}
    page = pair_page(site, MODEL)
    assert auc_column(page) == {"knorm": ("1", "57.50"), "snapkv": ("2", "46.11"), "tova": ("-", "-")}
    assert "AUC (mean acc. 30–60%)" in page and 'id="no-reference"' in page and 'id="no-common-range"' not in page


def test_an_empty_common_range_gives_no_auc_and_a_notice(tmp_path):
    write_run(tmp_path, "r__no_press", "no_press", None, 80.0, 0.0)
    write_run(tmp_path, "r__knorm__0", "knorm", 0.5, 70.0, 0.5)
    write_run(tmp_path, "r__snapkv__0", "snapkv", 0.0, 79.0, 0.0)  # measured only at 0: c* = 0
    ranking = ranked(tmp_path)
    assert (ranking.start, ranking.end, ranking.scored) == (0.0, 0.0, False)
    assert [(p.label, p.auc, p.rank) for p in ranking.presses] == [("knorm", None, 0), ("snapkv", None, 0)]
    site = build_site(tmp_path, tmp_path / "site").parent
    page = pair_page(site, MODEL)
    notice = re.search(r'<p class="notice" id="no-common-range">(.*?)</p>', page, re.S).group(1)
    assert "snapkv was measured only at 0.0% compression, so c* = 0.0%" in " ".join(notice.split())
    assert "<th class=\"num\">AUC</th>" in page and "shaded band" not in page  # no range to print or shade
    assert auc_column(page) == {"knorm": ("-", "-"), "snapkv": ("-", "-")}
    assert 'class="best"' not in (site / "index.html").read_text()  # nobody ranked, nobody best


def test_ranking_plot_and_per_task_breakdown(site):
    page = pair_page(site, MODEL)
    ranking = table_rows(page, "ranking")
    # rank (tie band), press, AUC, tied with, measured to, no-loss compression, points. kvzap_mlp and knorm
    # (kvpress) were measured to 50% only, so every AUC is the mean accuracy over [0, 0.5] through the reference (80)
    # at 0: knorm ((80+78)/2*0.25 + (78+75)/2*0.25) / 0.5 = 77.75; knorm (kvpress) (80+75)/2 = 77.5;
    # kvzap_mlp (80+72)/2 = 76; snapkv ((80+60)/2*0.25 + (60+50)/2*0.25) / 0.5 = 62.5. Our hand-made runs answer
    # their one question per task right, so their intervals have no width; the kvpress run got one of its two niah
    # questions right, and only its right one (niah_single_1-0) is shared with our runs: replicates that drop it
    # leave our runs without a niah score and are skipped, so its AUC interval is [77.5, 90]. That ties it with
    # knorm (77.75) above, and puts it clearly ahead of kvzap_mlp (76) below.
    assert [[value(cell) for cell in row] for row in ranking] == [
        ["=1", "knorm", "77.75", "knorm (kvpress)", "75.0%", "0.0%", "3"],
        ["=1", "knorm (kvpress)", "77.50", "knorm", "50.0%", "0.0%", "1"],
        ["3", "kvzap_mlp", "76.00", "-", "50.0%", "0.0%", "1"],
        ["4", "snapkv", "62.50", "-", "75.0%", "0.0%", "3"]]
    assert ranking[1][2] == "77.50 [77.5, 90.0]"
    matched = {row[0]: [value(cell) for cell in row[1:]] for row in table_rows(page, "matched")}
    assert matched["knorm"] == ["78.00", "75.00", "70.00", "-", "0.0%"]  # at 25/50/75/87.5%, no-loss compression
    assert matched["kvzap_mlp"] == ["-", "72.00", "-", "-", "0.0%"]  # one point at 50%: the others not covered
    assert '<th class="num">AUC (mean acc. 0–50%)</th>' in page
    method = re.search(r'<p class="method" id="method">(.*?)</p>', page, re.S).group(1)
    assert "here 0–50%" in method and "(here 50.0%, set by knorm (kvpress), kvzap_mlp)" in method
    assert "divided by c*" in method and 'id="no-common-range"' not in page
    row = next(row for row in re.findall(r"<tr>.*?</tr>", (site / "index.html").read_text(), re.S)
               if f">{MODEL}</a>" in row)
    best = re.findall(r'<span class="best">(.*?)</span>', row)
    assert [re.sub(r" \[.*?\]", "", b) for b in best[:3]] == [
        "=1. knorm <small>77.75</small>", "=1. knorm (kvpress) <small>77.50</small>",
        "3. kvzap_mlp <small>76.00</small>"]
    plot = re.search(r'<img src="\.\./(plots/[^"]+\.svg)"', page).group(1)
    svg = (site / plot).read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    tasks = table_rows(page, "tasks")
    knorm_50 = next(row for row in tasks if row[:2] == ["knorm", "compression_ratio=0.5"])
    # achieved, overall, delta vs no_press, niah_single_1, vt
    assert [value(cell) for cell in knorm_50[2:]] == ["50.0%", "75.00", "\u22125.00", "82.00", "68.00"]
    assert "niah_single_1<br><small>string_match_all</small>" in page
    for detail in ("2025-06-01T12:00:00+00:00", "max_new_tokens=16", "do_sample=False", "Press(compression_ratio=0.5)"):
        assert detail in page


def test_kvpress_runs_sit_beside_ours(site):
    page = pair_page(site, MODEL)
    kvpress = next(row for row in table_rows(page, "tasks") if row[0] == "knorm (kvpress)")
    # scored here: 1/2 niah right, vt right; the niah interval spans every outcome of resampling its two questions.
    # The paired delta skips the replicates where no_press (which answered only niah_single_1-0) has no niah score
    assert kvpress[2:] == ["50.0%", "75.00 [50.0, 100.0]", "\u22125.00 [\u22125.0, +20.0]", "50.00 [0.0, 100.0]",
                           "100.00 [100.0, 100.0]"]
    assert "knorm (kvpress)" in [row[1] for row in table_rows(page, "ranking")]


def test_every_link_stays_inside_the_site(site):
    predictions = 0
    for name, html in pages(site).items():
        for link in re.findall(r'(?:href|src)="(?!data:)([^"#]+)', html):  # data: URLs are inline
            assert "://" not in link and not link.startswith("//"), (name, link)
            target = (site / name).parent / link.replace("&#34;", '"').replace("&#39;", "'").replace("&amp;", "&")
            assert target.resolve().is_file() and target.resolve().is_relative_to(site.resolve()), (name, link)
            predictions += link.endswith(("predictions.jsonl", "predictions.csv"))
    assert predictions == 14  # every run's raw predictions, the pending one and the kvpress one included


def test_rebuild_is_byte_identical(results, site, tmp_path):
    def snapshot(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    build_site(results, tmp_path / "again")
    assert snapshot(tmp_path / "again") == snapshot(site)
    build_site(results, tmp_path / "again")  # over its own earlier build: replaced
    assert snapshot(tmp_path / "again") == snapshot(site)
    inside = results / "site"
    try:  # a site kept inside the results folder is not read back as runs, built there or elsewhere
        build_site(results, inside)
        assert snapshot(inside) == snapshot(site)
        build_site(results, tmp_path / "beside")
        assert snapshot(tmp_path / "beside") == snapshot(site)
    finally:
        shutil.rmtree(inside)


def test_hostile_strings_are_escaped(site):
    html = "".join(pages(site).values())
    for raw in ("<script>window.pwned", "<img src=x", "</td></tr></table><script>", "onerror=\"window"):
        assert raw not in html
    assert "&lt;script&gt;window.pwned=1;alert(&#34;x&#34;)&lt;/script&gt;&#34;&#39;model" in html
    for svg in site.glob("plots/*.svg"):
        assert "<script" not in svg.read_text() and "<img" not in svg.read_text()


def test_empty_results_render_a_notice(tmp_path):
    (tmp_path / "results").mkdir()
    index = build_site(tmp_path / "results", tmp_path / "site").read_text()
    assert 'id="no-runs"' in index and "<table" not in index


def test_unfinished_and_unreadable_runs_render_with_notices(tmp_path):
    results = tmp_path / "results"
    running = write_run(results, "tiny__ruler__knorm__0", "knorm", 0.5, 70.0, 0.5, finished=False)
    with (running / "predictions.jsonl").open("a") as handle:
        handle.write('{"sample_id": "vt-1", "predic')  # a sweep is writing this line right now
    before = (running / "predictions.jsonl").read_bytes()
    (results / "stray").mkdir()
    (results / "stray" / "predictions.jsonl").write_text('{"sample_id": "a"}\n')  # no config.yaml
    index = build_site(results, tmp_path / "site").read_text()
    assert 'id="pending"' in index and 'id="skipped"' in index and "<code>stray</code>" in index
    page = pair_page(tmp_path / "site", MODEL)
    assert 'id="no-finished"' in page and "pending: no metrics.json yet" in page and "<img" not in page
    assert not (tmp_path / "site" / "plots").exists()
    assert "<tr><th>samples</th><td>2</td></tr>" in page  # the two complete lines
    assert (running / "predictions.jsonl").read_bytes() == before  # results are only read, never repaired


def test_builds_without_the_runner_or_models(tmp_path):
    """Data flows one way: building a site never imports what makes results."""
    (tmp_path / "results").mkdir()
    code = ("import sys; from leaderboard import build_site; build_site(sys.argv[1], sys.argv[2]); "
            "print(sorted(m for m in sys.modules if m.startswith('evaluation')))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "results"), str(tmp_path / "site")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'evaluation.scoring'" in result.stdout
    assert "evaluation.runner" not in result.stdout and "evaluation.models" not in result.stdout


def test_refuses_a_folder_it_did_not_build(results, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a leaderboard"):
        build_site(results, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="not a folder of results"):
        build_site(tmp_path / "missing", tmp_path / "site")


def answered(right: list[bool], task: str = "niah_single_1") -> list[dict]:
    """Predictions of one task, right or wrong as given, with the sample ids a sweep gives them."""
    return [{"sample_id": f"{task}-{i}", "task": task, "question": "q", "answer": ["42"],
             "prediction": "42" if ok else "7", "compression_ratio": 0.0} for i, ok in enumerate(right)]


def test_bootstrap_is_seeded_and_covers_a_known_proportion():
    rng = np.random.default_rng(7)
    samples = {"run": [(f"s{i}", "t", 100.0 * (rng.random() < 0.7)) for i in range(60)]}
    assert (resample_accuracies(samples)["run"] == resample_accuracies(samples)["run"]).all()  # same seed, same draws
    assert not (resample_accuracies(samples, seed=1)["run"] == resample_accuracies(samples)["run"]).all()
    # coverage: 200 data sets of 100 questions answered right with probability 0.7; the 95% interval should hold the
    # true 70% about 95% of the time (percentile intervals of a proportion run a little under at n = 100)
    hits = 0
    for trial in range(200):
        rows = [(f"s{i}", "t", 100.0 * (rng.random() < 0.7)) for i in range(100)]
        low, high = interval(resample_accuracies({"run": rows}, resamples=1000, seed=trial)["run"])
        hits += low <= 70.0 <= high
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_per_sample_scores_average_to_the_committed_task_scores():
    """The bootstrap resamples the registry's per-sample headline scores: their mean per task is the task's score."""
    from evaluation.metrics.registry import headline_sample_scores

    baseline = Path(__file__).parent.parent / "results" / "baseline"
    folder = next(baseline.glob("kvtiny__ruler__snapkv__compression_ratio=0.5__*"))
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "metrics.json").read_text())
    scores = headline_sample_scores("ruler", records)
    for task, task_scores in metrics["per_task"].items():
        mine = [score for record, score in zip(records, scores, strict=True) if record["task"] == task]
        assert round(100 * sum(mine) / len(mine), 2) == task_scores[metrics["metric"][task]], task


def test_the_committed_baseline_page_has_every_section(tmp_path):
    """Built from results/baseline (ratio presses and the kvzap threshold presses): intervals wherever a score
    appears, the matched-compression table, the memory table, the heatmap, no_press's score with its interval."""
    baseline = Path(__file__).parent.parent / "results" / "baseline"
    site = build_site(baseline, tmp_path / "site").parent
    page = pair_page(site, "kvtiny")
    interval_ = re.compile(r"^\u2212?\+?\d+\.\d+%? \[\u2212?\+?\d+\.\d%?, \u2212?\+?\d+\.\d%?\]$")
    for table, columns in (("ranking", [2, 5]), ("matched", [2, 3, 5]), ("tasks", [3, 4, 5, 6])):
        for row in table_rows(page, table):
            for index in columns:
                assert row[index] == "-" or interval_.match(row[index]), (table, row)
    matched = {row[0]: row for row in table_rows(page, "matched")}
    assert {"kvzap_mlp", "kvzap_linear", "knorm"} <= set(matched)
    assert 'id="memory"' in page and 'id="not-measured"' not in page and 'id="task-heatmap"' in page
    no_press = next(run.metrics["overall"] for run in read_results(baseline).runs if run.press == "no_press")
    reference = re.search(rf"no_press</code> scores {no_press:.2f} <small class=\"ci\">\[(.*?), (.*?)\]", page)
    low, high = map(float, reference.groups())
    assert low < no_press < high and high - low > 5  # 60 questions: several points either way


def test_deltas_are_paired_on_the_same_questions(tmp_path):
    """Two presses that differ from no_press on the same number of questions but where no_press answered otherwise:
    paired, one that fails exactly one of no_press's right answers has a tight delta; resampled apart it would not."""
    right = [i % 2 == 0 for i in range(40)]  # no_press: 20 of 40
    one_off = [ok and i != 0 for i, ok in enumerate(right)]  # the same answers but one: 19 of 40
    write_run(tmp_path, "r__no_press", "no_press", None, 50.0, 0.0, task_scores={"niah_single_1": 50.0},
              predictions=answered(right))
    write_run(tmp_path, "r__knorm__0", "knorm", 0.5, 47.5, 0.5, task_scores={"niah_single_1": 47.5},
              predictions=answered(one_off))
    page = pair_page(build_site(tmp_path, tmp_path / "site").parent, MODEL)
    row = next(row for row in table_rows(page, "tasks") if row[0] == "knorm")
    low, high = (float(x.replace("\u2212", "-")) for x in re.search(r"\[(.*?), (.*?)\]", row[4]).groups())
    assert value(row[4]) == "\u22122.50" and -7.6 <= low <= high <= 0.0  # one question of 40: at most 2.5 points
    unpaired = interval(resample_accuracies({"a": [(f"a{i}", "t", 100.0 * ok) for i, ok in enumerate(right)]})["a"])
    assert unpaired[1] - unpaired[0] > 20  # the accuracy alone is uncertain by about +-15 points


MEASURED = {"kv_bytes_dense": 8 * 2**20, "kv_bytes_held": {"after_prefill": 4 * 2**20, "end": 5 * 2**20},
            "peak_memory_bytes": 100 * 2**20, "prefill_tokens_per_s": 1234.5, "decode_tokens_per_s": 56.25}


def add_metrics(folder: Path, **fields) -> None:
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, **fields}))


def test_memory_and_speed_are_shown_when_measured(tmp_path):
    add_metrics(write_run(tmp_path, "r__no_press", "no_press", None, 80.0, 0.0), kv_bytes_dense=8 * 2**20,
                kv_bytes_held=8 * 2**20, decode_tokens_per_s=50.0)
    add_metrics(write_run(tmp_path, "r__knorm__0", "knorm", 0.5, 70.0, 0.5), **MEASURED)
    write_run(tmp_path, "r__snapkv__0", "snapkv", 0.5, 60.0, 0.5)  # not measured: "-" in its row
    page = pair_page(build_site(tmp_path, tmp_path / "site").parent, MODEL)
    assert 'id="not-measured"' not in page and "peak GPU memory" not in page  # no run has an allocator's peak
    rows = {row[0]: row[4:] for row in table_rows(page, "memory")}
    # held / dense, held (the "end" value preferred), peak, prefill tok/s, decode tok/s
    assert rows["knorm"] == ["62.5%", "5.0 MiB", "100.0 MiB", "1,234.5", "56.2"]
    assert rows["no_press"] == ["100.0%", "8.0 MiB", "-", "-", "50.0"]
    assert rows["snapkv"] == ["-"] * 5
    plot = re.search(r'<img src="\.\./(plots/[^"]+__memory\.svg)" alt="Accuracy versus KV-cache bytes', page)
    assert plot and (tmp_path / "site" / plot.group(1)).read_text().startswith("<?xml")


def test_a_gpu_allocators_peak_gets_its_own_column(tmp_path):
    """On a GPU, cells run one context at a time record the allocator's peak (weights included) and the cache's own
    beside it; batched cells record the cache's. The peak KV column compares the caches; the allocator's is apart."""
    add_metrics(write_run(tmp_path, "r__knorm__0", "knorm", 0.5, 70.0, 0.5), **MEASURED)
    add_metrics(write_run(tmp_path, "r__kvzap__0", "kvzap_mlp", -4.0, 65.0, 0.6), **{
        **MEASURED, "peak_memory_bytes": 16 * 2**30, "peak_memory_source": "cuda_allocator",
        "kv_bytes_peak": 40 * 2**20})
    page = pair_page(build_site(tmp_path, tmp_path / "site").parent, MODEL)
    assert "<th class=\"num\">peak KV</th><th class=\"num\">peak GPU memory</th>" in page
    rows = {row[0]: row[4:] for row in table_rows(page, "memory")}
    assert rows["knorm"][2:4] == ["100.0 MiB", "-"]
    assert rows["kvzap_mlp"][2:4] == ["40.0 MiB", "16,384.0 MiB"]


def test_memory_and_speed_not_measured_says_so(site):
    page = pair_page(site, MODEL)
    assert 'id="not-measured"' in page and 'id="memory"' not in page and "__memory.svg" not in page


def test_task_heatmap_at_the_chosen_compression(site, results, tmp_path):
    page = pair_page(site, MODEL)
    rows = {row[0]: row[1:] for row in table_rows(page, "task-heatmap")}
    # columns niah_single_1, vt; each task score = accuracy + 7 / - 7, interpolated at 50%
    assert rows["no_press"] == ["87.0", "73.0"] and rows["knorm"] == ["82.0", "68.0"]
    assert rows["kvzap_mlp"] == ["79.0", "65.0"] and rows["snapkv"] == ["57.0", "43.0"]
    assert 'class="num h8"' in page  # 82 rounds to the 8th of 10 colour classes
    at_25 = pair_page(build_site(results, tmp_path / "at25", heatmap_level=0.25).parent, MODEL)
    rows = {row[0]: row[1:] for row in table_rows(at_25, "task-heatmap")}
    assert rows["knorm"] == ["85.0", "71.0"] and rows["kvzap_mlp"] == ["-", "-"]  # kvzap measured at 50% only


def test_needle_heatmap_for_needle_runs(tmp_path):
    grid = NEEDLE_GRID
    for press, value_ in (("no_press", None), ("knorm", 0.5)):
        folder = write_run(tmp_path, f"n__{press}", press, value_, 60.0, value_ or 0.0)
        set_dataset(folder, "needle_in_haystack")
        add_metrics(folder, dataset="needle_in_haystack", by_length_depth=grid)
    site = build_site(tmp_path, tmp_path / "site").parent
    page = pair_page(site, MODEL, "needle_in_haystack")
    assert "depth × context length" in page
    for index in (0, 1):
        table = re.search(rf'<table class="heatmap" id="needle-{index}">.*?</table>', page, re.S).group(0)
        assert "<th class=\"num\">512</th><th class=\"num\">1,024</th>" in table
        assert table_rows(table, f"needle-{index}") == [["0%", "100.0", "90.0"], ["50%", "50.0", "0.0"]]
    ruler = write_run(tmp_path / "r", "r__knorm", "knorm", 0.5, 60.0, 0.5)
    add_metrics(ruler, by_length_depth=grid)  # only the needle dataset's page draws it
    assert "needle-0" not in pair_page(build_site(tmp_path / "r", tmp_path / "site2").parent, MODEL)


def test_index_summarises_each_model_across_datasets(tmp_path):
    for dataset, knorm, snapkv in (("ruler", 70.0, 60.0), ("ruler-4096", 50.0, 65.0), ("other", 40.0, 30.0)):
        for press, accuracy in (("no_press", 80.0), ("knorm", knorm), ("snapkv", snapkv)):
            folder = write_run(tmp_path, f"{dataset}__{press}", press, None if press == "no_press" else 0.5,
                               accuracy, 0.0 if press == "no_press" else 0.5)
            set_dataset(folder, dataset)
    index = build_site(tmp_path, tmp_path / "site").read_text()
    # AUC over [0, 0.5] through no_press = (80 + accuracy) / 2; normalised by 80. knorm ranks 1, 2, 1: mean 1.33;
    # AUCs 75, 65, 60 -> 93.75%, 81.25%, 75% -> 83.3%. snapkv ranks 2, 1, 2; AUCs 70, 72.5, 55 -> 82.3%
    rows = table_rows(index, "summary-1")
    assert [[value(cell) for cell in row] for row in rows] == [["knorm", "1.3", "83.3%", "3"],
                                                                ["snapkv", "1.7", "82.3%", "3"]]
    assert rows[0][2] == "83.3% [83.3%, 83.3%]"  # every question answered right: no spread to resample
    assert "3 dataset(s)" in index


def test_kvpress_leaderboard_layout(tmp_path):
    """The kvpress leaderboard's benchmark/<dataset>__<data_dir>__<model>__<press>__<ratio>/ folders: the folder name
    fills what config.yaml leaves out; they show beside our runs on a page of their own data_dir."""
    folder = tmp_path / "benchmark" / "ruler__4096__Qwen--Qwen3-8B__knorm__0.50"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"max_new_tokens": 16, "seed": 42}))
    (folder / "metrics.json").write_text(json.dumps({"niah_single_1": {"string_match": 50.0}}))
    (folder / "predictions.csv").write_text("task,question,answer,predicted_answer\n"
                                            "niah_single_1,q,['42'],42\nniah_single_1,q,['7'],8\n")
    reference = tmp_path / "benchmark" / "ruler__4096__Qwen--Qwen3-8B__no_press__0.00"
    shutil.copytree(folder, reference)
    (reference / "predictions.csv").write_text("task,question,answer,predicted_answer\n"
                                               "niah_single_1,q,['42'],42\nniah_single_1,q,['7'],7\n")
    runs = read_results(tmp_path).runs
    assert {(r.model, r.dataset, r.data_dir, r.press, r.knob, r.value, r.compression) for r in runs} == {
        ("Qwen/Qwen3-8B", "ruler", "4096", "knorm", "compression_ratio", 0.5, 0.5),
        ("Qwen/Qwen3-8B", "ruler", "4096", "no_press", None, None, 0.0)}
    site = build_site(tmp_path, tmp_path / "site").parent
    page = pair_page(site, "Qwen/Qwen3-8B", "ruler (4096)")
    assert "ruler (4096)" in page and table_rows(page, "ranking")[0][1] == "knorm (kvpress)"
    assert any(name.endswith("metrics.json") for name in map(str, (site / "runs").rglob("*")))


# Headless Chromium ---------------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or importlib.util.find_spec("selenium") is None,
    reason="needs the chromium and chromium-driver Debian packages and the selenium Python package")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Keep pytest's output clean of access logs."""


@pytest.fixture(scope="module")
def served(site):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # given paths: Selenium Manager never looks for (or downloads) a browser
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver) -> list[str]:
    messages = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def column(driver, table_id: str, index: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(`#${arguments[0]} tbody tr`), r => r.cells[arguments[1]]"
        ".textContent.trim())", table_id, index)


@needs_browser
def test_site_in_headless_chromium(site, served, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    browser.get("about:blank")
    browser.get_log("browser")  # drop what the browser did before our pages
    browser.get_log("performance")
    for name in pages(site):
        browser.get(served + name)
        pytest.raises(NoAlertPresentException, getattr, browser.switch_to, "alert")  # no script opened one
        assert browser.execute_script("return window.pwned") is None, name
        images = browser.execute_script("return Array.from(document.images, i => i.complete && i.naturalWidth)")
        assert all(images), (name, images)  # the plot loaded
        assert severe(browser) == [], name  # no console errors: no script error, CSP report or 404
        outside = [url for url in requested_urls(browser) if not url.startswith((served, "data:"))]
        assert outside == [], name

    browser.get(served + "index.html")
    browser.find_element(By.LINK_TEXT, MODEL).click()
    ranked = ["knorm", "knorm (kvpress)", "kvzap_mlp", "snapkv"]  # by AUC over [0, 0.5]: 77.75, 77.5, 76, 62.5
    assert column(browser, "ranking", 1) == ranked

    def click(header: str, table: str = "ranking") -> None:
        browser.find_element(By.XPATH, f'//table[@id="{table}"]//th[text()="{header}"]').click()

    click("press")
    assert column(browser, "ranking", 1) == sorted(ranked)
    click("press")
    assert column(browser, "ranking", 1) == sorted(ranked, reverse=True)

    def numbers(index: int) -> list[str]:
        return [cell.split(" [")[0] for cell in column(browser, "matched", index)]

    click("accuracy at 50%", "matched")  # numeric columns sort largest first, by the score, not its interval
    assert numbers(2) == ["75.00", "75.00", "72.00", "50.00"]
    click("accuracy at 25%", "matched")
    click("accuracy at 25%", "matched")  # ascending now, and "-" (level not covered) still last
    assert numbers(1) == ["60.00", "78.00", "-", "-"]
    browser.save_screenshot(str(tmp_path / "leaderboard.png"))
    assert (tmp_path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    browser.find_element(By.LINK_TEXT, "all models and datasets").click()
    browser.find_element(By.PARTIAL_LINK_TEXT, "<script>window.pwned=1").click()
    text = browser.find_element(By.TAG_NAME, "body").text
    for shown in (HOSTILE + "model", HOSTILE_PRESS, "</td></tr></table><script>window.pwned=3</script>"):
        assert shown in text
    assert browser.execute_script("return window.pwned") is None

    browser.get((site / next(name for name in pages(site) if "pwned" in name)).as_uri())
    assert browser.execute_script("return document.images.length && document.images[0].naturalWidth") > 0
    assert severe(browser) == []  # opened from disk too: the page's policy allows its own files over file://


LAYOUT = """
const problems = [];
const main = document.querySelector("main");
const padding = parseFloat(getComputedStyle(main).paddingLeft) + parseFloat(getComputedStyle(main).paddingRight);
for (const cell of document.querySelectorAll("td, th")) {
  const text = cell.textContent.trim().slice(0, 50);
  if (cell.scrollWidth > cell.clientWidth) problems.push(["overflows", text, cell.scrollWidth, cell.clientWidth]);
  const free = cell.matches(".prose, .list");  // prose wraps; lists wrap between their items only
  if (!free && getComputedStyle(cell).whiteSpace !== "nowrap") problems.push(["may break", text]);
  if (cell.matches(".list")) for (const item of cell.children)
    if (getComputedStyle(item).whiteSpace !== "nowrap") problems.push(["item may break", item.textContent]);
}
for (const image of document.images) {
  if (!image.alt.trim()) problems.push(["no alt text", image.src]);
  const width = image.getBoundingClientRect().width;
  if (width < 0.98 * (main.clientWidth - padding)) problems.push(["plot narrower than the content", width]);
}
for (const abbr of document.querySelectorAll(".abbr"))
  if (!abbr.title || !abbr.textContent.endsWith("…") || !abbr.title.startsWith(abbr.textContent.slice(0, -1)))
    problems.push(["abbreviation without its full text", abbr.textContent]);
const page = document.documentElement;
if (page.scrollWidth > page.clientWidth) problems.push(["the page scrolls sideways", page.scrollWidth]);
return problems;
"""


@needs_browser
def test_layout_at_1400_and_800_px(site, served, browser, tmp_path):
    """No cell overflows (scrollWidth <= clientWidth) or may break a number or name, every plot has alt text and
    spans the content width, long names are cut with a tooltip, and no page scrolls sideways, at both widths."""
    names = list(pages(site))
    assert len(names) == 5  # index, tiny-model ruler, hostile, measured ruler and needle
    for width in (1400, 800):
        browser.set_window_size(width, 1000)
        for name in names:
            browser.get(served + name)
            assert browser.execute_script(LAYOUT) == [], (width, name)
        browser.get(served + "index.html")
        browser.save_screenshot(str(tmp_path / f"index-{width}.png"))
    browser.get(served + next(name for name in names if "measured__ruler" in name))
    cut = browser.execute_script("return Array.from(document.querySelectorAll('.abbr'), a => a.title)")
    assert LONG_PRESS in cut
    for table in ("ranking", "matched", "memory", "tasks", "task-heatmap"):
        assert browser.find_element("id", table).is_displayed()
    browser.get(served + next(name for name in names if "needle_in_haystack" in name))
    assert browser.find_element("id", "needle-0").is_displayed()  # the depth x length heatmap
    browser.set_window_size(1280, 1000)
