"""`fedsim compare`: grid cells, resume, failed cells, the summary over seeds."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.compare import cell_filter, load_comparison, run_comparison
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.registry import check_config
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
[experiment]
name = "grid"
rounds = 2
[data]
num_clients = 6
[model]
name = "logreg"
[strategy]
clients_per_round = 3
[evaluation]
client_fraction = 0.0
[engine]
backend = "inprocess"
[output]
dir = "{out}"
save_model = false
[compare.grid]
"data.partition.alpha" = [1.0, 0.1]
"experiment.seed" = [0, 1]
[compare.variants.fedavg]
"strategy.name" = "fedavg"
[compare.variants.fedprox]
"strategy.name" = "fedprox"
"strategy.mu" = 0.1
"""


def write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text.format(out=tmp_path / "runs"))
    return path


def run_cell(cell) -> None:
    run_experiment(cell.config)


def test_grid_runs_every_cell_resumes_and_summarizes_over_seeds(tmp_path):
    folder, cells = load_comparison(write_spec(tmp_path))
    assert len(cells) == 8 and folder == tmp_path / "runs" / "grid"
    assert cells[0].name == "fedavg__alpha=1.0__seed=0"
    assert cells[-1].config.strategy.params == {"mu": 0.1}
    table = run_comparison(folder, cells, run_cell, lambda cell, status: None)
    assert (table["status"] == "done").all()
    summary = pd.read_csv(folder / "summary.csv")
    assert len(summary) == 4 and (summary["final_accuracy_count"] == 2).all()
    one = table[(table["variant"] == "fedprox") & (table["alpha"] == 0.1)]["final_accuracy"]
    row = summary[(summary["variant"] == "fedprox") & (summary["alpha"] == 0.1)].iloc[0]
    assert row["final_accuracy_mean"] == pytest.approx(one.mean())
    assert row["final_accuracy_std"] == pytest.approx(one.std())

    def must_not_run(cell):
        raise AssertionError(f"{cell.name} was finished and must be skipped")

    again = run_comparison(folder, cells, must_not_run, lambda cell, status: None)
    assert (again["status"] == "done").all()
    assert again["final_accuracy"].tolist() == table["final_accuracy"].tolist()


def test_a_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    spec = SPEC.replace('"data.partition.alpha" = [1.0, 0.1]', '"data.partition.min_size" = [5, 400]')
    folder, cells = load_comparison(write_spec(tmp_path, spec))
    table = run_comparison(folder, cells[:4], run_cell, lambda cell, status: None)
    assert table["status"].tolist() == ["done", "done", "failed", "failed"]
    assert table["error"].iloc[2].startswith("DataError: cannot give 6 clients at least 400")
    assert (cells[2].run_dir / "error.txt").is_file()
    assert "cells.csv" in {p.name for p in folder.iterdir()}


def test_bad_grid_keys_fail_before_anything_runs(tmp_path):
    typo = "cell fedavg__alpah=1.0__seed=0: .*unknown key 'data.partition.alpah'; did you mean 'alpha'"
    with pytest.raises(ConfigError, match=typo):
        load_comparison(write_spec(tmp_path, SPEC.replace("data.partition.alpha", "data.partition.alpah")))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['grids'\] in \[compare\]"):
        load_comparison(write_spec(tmp_path, SPEC.replace("[compare.grid]", "[compare.grids]")))
    assert not (tmp_path / "runs").exists()


def test_compare_command_runs_the_grid(tmp_path):
    spec = SPEC.replace('"experiment.seed" = [0, 1]', '"experiment.seed" = [0]')
    command = [sys.executable, "-m", "fedsim.cli", "compare", str(write_spec(tmp_path, spec)),
               "--set", "experiment.rounds=1"]
    part = subprocess.run([*command, "--only", "fedprox"], capture_output=True, text=True, cwd=ROOT)
    assert part.returncode == 0, part.stderr
    assert "2 of 2 cells done, 2 not chosen by --only" in part.stdout + part.stderr
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "4 of 4 cells done" in result.stdout + result.stderr
    assert len(pd.read_csv(tmp_path / "runs" / "grid" / "cells.csv")) == 4


def test_cells_shared_out_with_only_each_run_once_and_every_table_lists_all_done(tmp_path):
    folder, cells = load_comparison(write_spec(tmp_path))
    ran: list[str] = []

    def run_and_note(cell):
        run_cell(cell)
        ran.append(cell.name)

    share = cell_filter(cells, ["fedprox", "alpha=0.1"])
    first = run_comparison(folder, cells, run_and_note, lambda cell, status: None, share)
    assert ran == ["fedprox__alpha=0.1__seed=0", "fedprox__alpha=0.1__seed=1"]
    assert first["cell"].tolist() == ran and len(pd.read_csv(folder / "cells.csv")) == 2
    second = run_comparison(folder, cells, run_and_note, lambda cell, status: None,
                            cell_filter(cells, ["seed=0"]))
    assert ran[2:] == ["fedavg__alpha=1.0__seed=0", "fedavg__alpha=0.1__seed=0",
                       "fedprox__alpha=1.0__seed=0"]
    table = pd.read_csv(folder / "cells.csv")  # the first share's cells too, finished earlier
    assert len(second) == len(table) == 5 and (table["status"] == "done").all()
    with pytest.raises(ConfigError, match="--only alpha=0.5: no cell has it; this grid's parts are "
                                          "alpha=0.1"):
        cell_filter(cells, ["alpha=0.5"])
    with pytest.raises(ConfigError, match="no cell has all of these parts"):
        cell_filter(cells, ["fedavg", "fedprox"])


def test_an_interrupted_comparison_restarted_runs_only_the_missing_cells(tmp_path):
    folder, cells = load_comparison(write_spec(tmp_path))
    ran: list[str] = []

    def interrupted_after_three(cell):
        if len(ran) == 3:
            raise KeyboardInterrupt
        run_cell(cell)
        ran.append(cell.name)

    with pytest.raises(KeyboardInterrupt):
        run_comparison(folder, cells, interrupted_after_three, lambda cell, status: None)
    first = list(ran)
    _, restarted_cells = load_comparison(write_spec(tmp_path))
    run_comparison(folder, restarted_cells, lambda cell: (run_cell(cell), ran.append(cell.name)),
                   lambda cell, status: None)
    assert ran[3:] == [c.name for c in cells[3:]]  # only the five missing cells ran again
    assert first == [c.name for c in cells[:3]]
    assert (pd.read_csv(folder / "cells.csv")["status"] == "done").all()


PUBLISHED = """
[compare.published]
source = "A paper, Table 1"
[[compare.published.values]]
variant = "fedprox"
level = "alpha=0.1"
value = 0.5
[[compare.published.values]]
variant = "fedavg"
value = 0.4
"""


def test_published_numbers_stand_beside_the_measured_with_their_gap_in_seed_stds(tmp_path):
    from fedsim.report import build_report

    folder, cells = load_comparison(write_spec(tmp_path, SPEC + PUBLISHED))
    run_comparison(folder, cells, run_cell, lambda cell, status: None)
    build_report([folder], tmp_path / "report.html")
    table = pd.read_csv(tmp_path / "report.csv").set_index(["level", "variant"])
    assert table.loc[("alpha=0.1", "fedprox"), "published final accuracy"] == 0.5
    assert pd.isna(table.loc[("alpha=1.0", "fedprox"), "published final accuracy"])
    assert (table.xs("fedavg", level="variant")["published final accuracy"] == 0.4).all()
    row = table.loc[("alpha=0.1", "fedprox")]
    expected = (row["final accuracy mean"] - 0.5) / row["final accuracy std"]
    assert row["final accuracy gap (stds)"] == pytest.approx(expected)
    page = (tmp_path / "report.html").read_text()
    assert "A paper, Table 1" in page and "published final accuracy (%)" in page and "50.0" in page


def test_two_comparisons_in_one_report_keep_each_ones_published_numbers():
    from fedsim.report.published import Published, with_published

    table = pd.DataFrame({"level": ["kind=dirichlet", "classes_per_client=2"], "variant": ["fedavg"] * 2,
                          "final accuracy mean": [0.875, 0.777], "final accuracy std": [0.01, 0.02]})
    first = Published(source="a", metric="final accuracy",
                      values=[{"variant": "fedavg", "level": "kind=dirichlet", "value": 0.884}])
    second = Published(source="b", metric="final accuracy",
                       values=[{"variant": "fedavg", "level": "classes_per_client=2", "value": 0.81}])
    merged = with_published(table, [first, second])
    assert merged["published final accuracy"].tolist() == [0.884, 0.81]
    assert merged["final accuracy gap (stds)"].tolist() == pytest.approx([-0.9, -1.65])


def test_published_numbers_are_checked_before_any_cell_runs(tmp_path):
    with pytest.raises(ConfigError, match="variant\\(s\\) \\['fedyogi'\\] the comparison does not have"):
        load_comparison(write_spec(tmp_path, SPEC + PUBLISHED.replace('"fedavg"', '"fedyogi"')))
    with pytest.raises(ConfigError, match="compare.published.*not a summary column"):
        load_comparison(write_spec(tmp_path, SPEC + PUBLISHED.replace('source', 'metric = "acc"\nsource')))


PRETRAIN_LINE = re.compile(r"^#\s+fedsim pretrain\s+(.+)$", re.MULTILINE)


def run_pretrain_steps(spec: Path) -> None:
    """Run the `fedsim pretrain` command lines of a spec's header (they write files named
    relative to the working directory), one epoch each."""
    for command in PRETRAIN_LINE.findall(spec.read_text()):
        args = shlex.split(re.sub(r"--epochs[= ]\d+", "", command))
        args = [str(ROOT / a) if a.endswith(".toml") else a for a in args]
        result = CliRunner().invoke(app, ["pretrain", *args, "--epochs", "1"])
        assert result.exit_code == 0, f"{command}: {result.output} {result.exception!r}"


@pytest.mark.parametrize("spec", sorted(ROOT.glob("experiments/**/*.toml")),
                         ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_experiment_spec_validates(spec, tmp_path, monkeypatch, request):
    """Each shipped spec passes every check a run makes before it starts (each cell of a
    comparison), after the pretraining its header prescribes."""
    if PRETRAIN_LINE.search(spec.read_text()):
        request.getfixturevalue("data_dir")  # pretraining reads the dataset: skip without it
    monkeypatch.chdir(tmp_path)
    run_pretrain_steps(spec)
    overrides = [f"output.dir={tmp_path}"]
    if "[compare" in spec.read_text():
        _, cells = load_comparison(spec, overrides)
        assert cells
    else:
        check_config(load_config(spec, overrides))


def test_a_missing_weights_or_encoder_file_stops_a_comparison_before_any_cell(tmp_path):
    for key, message in [("model.init", "model.init = .*no such file"),
                         ("data.embedding", "data.embedding = .*no such file")]:
        with pytest.raises(ConfigError, match=message):
            load_comparison(write_spec(tmp_path, SPEC), [f"{key}={tmp_path / 'missing.pt'}"])
