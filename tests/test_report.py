"""The HTML report: built from a real comparison, rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedsim.compare import load_comparison, run_comparison
from fedsim.report import build_report
from fedsim.runner import run_experiment

SPEC = """
[experiment]
name = "report"
rounds = 4
[data]
num_clients = 8
[model]
name = "logreg"
[strategy]
clients_per_round = 4
[evaluation]
every = 2
client_fraction = 1.0
client_every = 2
decomposition = true
decomposition_clients = 4
[engine]
backend = "inprocess"
[output]
dir = "{out}"
save_model = false
[compare.grid]
"data.partition.alpha" = [10.0, 0.1]
"experiment.seed" = [0, 1]
[compare.variants.fedavg]
"strategy.name" = "fedavg"
[compare.variants.fedld]
"strategy.name" = "fedld"
"""


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(out=root / "runs"))
    folder, cells = load_comparison(spec)
    run_comparison(folder, cells, lambda cell: run_experiment(cell.config), lambda cell, status: None)
    return folder


def test_report_summarizes_every_level_and_variant(comparison):
    out = build_report([comparison], comparison / "report.html", "test report")
    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == 4 and (table["seeds"] == 2).all()
    assert set(table["variant"]) == {"fedavg", "fedld"}
    assert table["client acc. mean mean"].between(0, 1).all()
    page = out.read_text()
    assert page.count("<svg") == 4  # curves, client boxes, federations, decomposition
    assert not re.search(r"(src|href)=[\"']?https?:|url\(https?:|<script[^>]+src", page)  # all inline
    assert "alpha=0.1" in page and "class='best'" in page


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (installed by .ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_renders_in_headless_chromium(comparison, tmp_path):
    out = build_report([comparison], tmp_path / "report.html", "fedsim test report")
    driver = chromium_driver()
    try:
        driver.get(out.as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        figures = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure svg')).map(s => {"
            "const r = s.getBoundingClientRect();"
            "return [r.width, r.height, s.querySelectorAll('path, use, image').length]; })")
        assert len(figures) == 4
        assert all(w > 200 and h > 150 and marks > 10 for w, h, marks in figures), figures
        height = driver.execute_script("return document.body.scrollHeight")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})
        screenshot = tmp_path / "report.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        assert screenshot.stat().st_size > 50_000
    finally:
        driver.quit()


def test_a_grid_over_seeds_only_is_one_level_and_missing_cells_are_fine(comparison, tmp_path):
    seeds_only = tmp_path / "seeds-only"
    seeds_only.mkdir()
    cells = pd.read_csv(comparison / "cells.csv")
    keep = cells[cells["alpha"] == 0.1].drop(columns=["alpha"])
    keep = keep[~((keep["variant"] == "fedld") & (keep["seed"] == 1))]
    for cell in keep["cell"]:
        shutil.copytree(comparison / cell, seeds_only / cell)
        if cell.startswith("fedld"):  # a variant that also sets a non-strategy key
            config = json.loads((seeds_only / cell / "config.json").read_text())
            config["ggeur"]["enabled"] = True
            (seeds_only / cell / "config.json").write_text(json.dumps(config))
    keep.to_csv(seeds_only / "cells.csv", index=False)
    out = build_report([seeds_only], tmp_path / "seeds.html")
    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == 2 and table["level"].isna().all()  # one level, however configs differ
    assert out.read_text().count("<svg") == 4


def test_report_of_a_run_without_a_central_test_set(tmp_path):
    """A deployment with `central_test = "none"` records only the clients' local accuracy."""
    from fedsim.config import load_config
    from fedsim.results import write_summary

    config = load_config(None, ["experiment.rounds=2", "engine.backend=inprocess",
                                f"output.dir={tmp_path}", "model.name=logreg"])
    run = run_experiment(config)
    rounds = run.rounds.drop(columns=[c for c in run.rounds if c.startswith("test_")])
    rounds.to_parquet(run.run_dir / "rounds.parquet")
    write_summary(run.run_dir, rounds, run.seconds)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == pytest.approx(rounds["client_eval_accuracy"].iloc[-1])
    table = pd.read_csv(build_report([run.run_dir], tmp_path / "r.html").with_suffix(".csv"))
    assert table["rounds to target mean"].isna().all()
    assert table["client acc. mean mean"].notna().all()


def test_summary_numbers_are_formatted_for_reading():
    from fedsim.report.tables import heading, mean_std_text

    assert mean_std_text("final accuracy", 0.60751, 0.00512) == "60.8 &plusmn; 0.5"
    assert heading("final accuracy") == "final accuracy (%)" and heading("MB exchanged") == "MB exchanged"
    assert mean_std_text("MB exchanged", 5.72, 0.0) == "5.72 &plusmn; 0.00"
    assert mean_std_text("rounds to target", 2.0, 0.0) == "2.0 &plusmn; 0.0"
    assert mean_std_text("wall seconds", 123.4, 5.67) == "123 &plusmn; 6"
    assert mean_std_text("wall seconds", 0.01234, float("nan")) == "0.012"
    assert mean_std_text("final accuracy", float("nan"), 0.1) == "-"
