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

import pytest
import yaml

from evaluation.config import ConfigError
from leaderboard import build_site
from leaderboard.ranking import accuracy_at, area_under_curve, curve

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
    return root


@pytest.fixture(scope="module")
def site(results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    assert build_site(results, out) == out / "index.html"
    return out


def pages(site: Path) -> dict[str, str]:
    return {path.relative_to(site).as_posix(): path.read_text() for path in sorted(site.rglob("*.html"))}


def pair_page(site: Path, model: str) -> str:
    return next(text for name, text in pages(site).items()
                if name.startswith("pairs/") and f"<h1>{model} <span" in text)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    """The text of each body cell of table ``table_id``."""
    body = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_auc_and_matched_levels_follow_their_definitions():
    assert curve([(0.5, 60.0), (0.25, 70.0), (0.5, 50.0)]) == [(0.25, 70.0), (0.5, 55.0)]
    assert area_under_curve([(0.5, 60.0)], reference=80.0) == pytest.approx((80 + 60) / 2 * 0.5)
    assert area_under_curve([(0.5, 60.0)], reference=None) is None
    assert area_under_curve([(0.25, 60.0), (0.75, 40.0)], reference=None) == pytest.approx(50 * 0.5)
    points = [(0.2, 70.0), (0.6, 50.0)]
    assert accuracy_at(points, 0.5) == pytest.approx(55.0)
    assert accuracy_at(points, 0.75) is None and accuracy_at(points, 0.1) is None
    assert accuracy_at([(0.499, 70.0), (0.749, 60.0)], 0.75) == 60.0  # achieved a hair under the requested 0.75


def test_ranking_plot_and_per_task_breakdown(site):
    page = pair_page(site, MODEL)
    ranking = table_rows(page, "ranking")
    # rank, press, AUC, measured to, at 25/50/75%, points: knorm dominates snapkv, so it ranks above it
    assert [row[:4] for row in ranking[:2]] == [["1", "knorm", "57.00", "75.0%"], ["2", "snapkv", "41.25", "75.0%"]]
    assert ranking[0][4:] == ["78.00", "75.00", "70.00", "3"]
    kvzap = next(row for row in ranking if row[1] == "kvzap_mlp")
    assert kvzap[2] == "38.00" and kvzap[4:7] == ["-", "72.00", "-"]  # one point at 50%: 25% and 75% not covered
    plot = re.search(r'<img src="\.\./(plots/[^"]+\.svg)"', page).group(1)
    svg = (site / plot).read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    tasks = table_rows(page, "tasks")
    knorm_50 = next(row for row in tasks if row[:2] == ["knorm", "compression_ratio=0.5"])
    assert knorm_50[2:] == ["50.0%", "75.00", "82.00", "68.00"]  # achieved, overall, niah_single_1, vt
    assert "niah_single_1<br><small>string_match_all</small>" in page
    for detail in ("2025-06-01T12:00:00+00:00", "max_new_tokens=16", "do_sample=False", "Press(compression_ratio=0.5)"):
        assert detail in page


def test_kvpress_runs_sit_beside_ours(site):
    page = pair_page(site, MODEL)
    kvpress = next(row for row in table_rows(page, "tasks") if row[0] == "knorm (kvpress)")
    assert kvpress[2:] == ["50.0%", "75.00", "50.00", "100.00"]  # scored here: 1/2 niah right, vt right
    assert "knorm (kvpress)" in [row[1] for row in table_rows(page, "ranking")]


def test_every_link_stays_inside_the_site(site):
    predictions = 0
    for name, html in pages(site).items():
        for link in re.findall(r'(?:href|src)="(?!data:)([^"#]+)', html):  # data: URLs are inline
            assert "://" not in link and not link.startswith("//"), (name, link)
            target = (site / name).parent / link.replace("&#34;", '"').replace("&#39;", "'").replace("&amp;", "&")
            assert target.resolve().is_file() and target.resolve().is_relative_to(site.resolve()), (name, link)
            predictions += link.endswith(("predictions.jsonl", "predictions.csv"))
    assert predictions == 11  # every run's raw predictions, the pending one and the kvpress one included


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
    ranked = ["knorm", "snapkv", "knorm (kvpress)", "kvzap_mlp"]  # by AUC: 57, 41.25, 38.75, 38
    assert column(browser, "ranking", 1) == ranked

    def click(header: str) -> None:
        browser.find_element(By.XPATH, f'//table[@id="ranking"]//th[text()="{header}"]').click()

    click("press")
    assert column(browser, "ranking", 1) == sorted(ranked)
    click("press")
    assert column(browser, "ranking", 1) == sorted(ranked, reverse=True)
    click("accuracy at 50%")  # numeric columns sort largest first
    assert column(browser, "ranking", 5) == ["75.00", "75.00", "72.00", "50.00"]
    click("accuracy at 25%")
    click("accuracy at 25%")  # ascending now, and "-" (level not covered) still last
    assert column(browser, "ranking", 4) == ["60.00", "78.00", "-", "-"]
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
