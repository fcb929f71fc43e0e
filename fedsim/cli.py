"""The `fedsim` command line."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedsim.errors import FedsimError

app = typer.Typer(help="fedsim: federated-learning simulations on Flower, PyTorch and Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _summary_table(rounds) -> Table:
    table = Table(title="Summary")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    for column, best in (("test_accuracy", max), ("test_loss", min),
                         ("client_eval_accuracy", max), ("train_loss", min)):
        if column in rounds:
            values = rounds[column].dropna()
            if len(values):
                table.add_row(column, _fmt(values.iloc[-1]), _fmt(best(values)))
    table.add_row("seconds per round (median)", _fmt(rounds["seconds"].dropna().median()), "")
    return table


def round_status(row: dict) -> str:
    """The progress bar's text for a finished round: latest accuracy and failures."""
    acc = row.get("test_accuracy")
    status = f"acc {acc:.4f}" if acc is not None and not math.isnan(acc) else ""
    if row.get("num_failures"):
        status += f"  failures {int(row['num_failures'])}"
    return status


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input or missing data: one `error: ...` line and exit status 2 (1 for a run that
    failed after it started), no traceback."""
    try:
        yield
    except FedsimError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=getattr(exc, "exit_code", 2)) from None


@app.command()
def run(
    experiment: Annotated[Path | None, typer.Argument(help="experiment spec (TOML)")] = None,
    set_: Annotated[list[str], typer.Option(
        "--set", help="override a key: --set strategy.name=fedprox")] = [],  # noqa: B006
    resume: Annotated[Path | None, typer.Option(
        help="continue this unfinished run directory from its last checkpoint (with a spec: "
             "only if the spec still describes that run)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs")] = False,
) -> None:
    """Run one federated simulation and write its run directory (or continue one: --resume)."""
    from fedsim.config import load_config
    from fedsim.engine.checkpoint import saved_rounds
    from fedsim.registry import check_config
    from fedsim.results import with_run_dir
    from fedsim.resume import saved_config
    from fedsim.runner import run_experiment

    with user_errors():
        if experiment is None and resume is None:
            raise FedsimError("give an experiment spec (fedsim run experiments/quickstart.toml), "
                              "or a run directory to continue (fedsim run --resume RUN_DIR)")
        if resume is None:
            config = load_config(experiment, set_)
        elif experiment is None:
            config = saved_config(resume)
        else:
            saved_config(resume)  # it must be a run directory
            config = load_config(experiment, [*set_, f"output.run_dir={resume}"])
        config = with_run_dir(config)
        check_config(config)
        rounds = config.experiment.rounds
        columns = [TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}")]
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("rounds", total=rounds, status="starting workers...")

            def progress(rnd: int, row: dict) -> None:
                bar.update(task, completed=rnd, status=round_status(row))

            try:
                summary = run_experiment(config, progress=progress, verbose=verbose,
                                         resume=resume is not None)
            except KeyboardInterrupt:
                run_dir = config.output.run_dir
                saved = saved_rounds(run_dir)
                console.print(f"interrupted: the finished rounds are in {run_dir} "
                              f"({f'last checkpoint: round {saved[-1]}' if saved else 'no checkpoint yet'}); "
                              f"continue with `fedsim run --resume {run_dir}`", soft_wrap=True)
                raise typer.Exit(code=130) from None
    console.print(_summary_table(summary.rounds))
    console.print(f"run directory: {summary.run_dir}  ({summary.seconds:.1f} s)", soft_wrap=True)


@app.command()
def compare(
    spec: Annotated[Path, typer.Argument(help="comparison spec: an experiment plus [compare]")],
    set_: Annotated[list[str], typer.Option(
        "--set", help="override a key of the base experiment")] = [],  # noqa: B006
    only: Annotated[list[str], typer.Option(
        "--only", help="run only the cells whose name has this part (a variant or key=value, "
        "e.g. --only fedprox --only seed=0); repeat to narrow")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs")] = False,
) -> None:
    """Run every cell of a comparison grid (finished cells are skipped, interrupted ones continue
    from their checkpoints) and tabulate them. Several processes may share out one grid's cells
    with --only."""
    from fedsim.compare import cell_filter, load_comparison, run_comparison
    from fedsim.runner import run_experiment

    with user_errors():
        folder, cells = load_comparison(spec, set_)
        chosen = cell_filter(cells, only)
    left = sum(1 for cell in cells if not cell.finished and not chosen(cell))
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console) as bar:
        grid = bar.add_task("cells", total=len(cells) - left, status="")
        rounds = bar.add_task("rounds", total=1, status="")

        def announce(cell, status: str) -> None:
            bar.update(grid, status=f"{cell.name}: {status}")
            if status != "running":
                bar.advance(grid)

        def run_cell(cell) -> None:
            bar.reset(rounds, total=cell.config.experiment.rounds)

            def progress(rnd: int, row: dict) -> None:
                bar.update(rounds, completed=rnd, status=round_status(row))

            run_experiment(cell.config, progress=progress, verbose=verbose, resume=True)
            bar.advance(grid)

        table = run_comparison(folder, cells, run_cell, announce, chosen)
    failed = int((table["status"] == "failed").sum())
    console.print(f"{len(table) - failed} of {len(table)} cells done"
                  + (f", {failed} failed (see cells.csv)" if failed else "")
                  + (f", {left} not chosen by --only" if left else "") + f"; results in {folder}",
                  soft_wrap=True)
    if failed < len(table):
        from fedsim.report import build_report

        report_file = build_report([folder], folder / "report.html", title=folder.name)
        console.print(f"report: {report_file}", soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


deploy_app = typer.Typer(help="Run an experiment on real clients (Flower SuperLink and SuperNodes).",
                         no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("local")
def deploy_local(
    experiment: Annotated[Path, typer.Argument(help="experiment spec (TOML)")],
    nodes: Annotated[int | None, typer.Option(
        help="SuperNodes to start, one client each (default: data.num_clients)")] = None,
    set_: Annotated[list[str], typer.Option(
        "--set", help="override a key: --set experiment.rounds=5")] = [],  # noqa: B006
    data_files: Annotated[str | None, typer.Option(
        help="each node's data file, with {id} for its client id (e.g. 'data/client-{id}.npz'); "
             "default: each node builds its partition of the experiment's dataset")] = None,
    timeout: Annotated[float, typer.Option(help="stop the run after this many seconds (0: never)")] = 0.0,
) -> None:
    """Deploy an experiment on this machine: a SuperLink and N SuperNodes on 127.0.0.1 with TLS
    and node authentication, each node one client; writes the same run directory as `run`."""
    import pandas as pd

    from fedsim.config import load_config
    from fedsim.deploy.local import run_local

    with user_errors():
        rounds = load_config(experiment, set_).experiment.rounds
        columns = [TextColumn("round {task.completed}/{task.total}"), BarColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("rounds", total=rounds, status="starting SuperLink and SuperNodes...")

            def progress(rnd: int, row: dict) -> None:
                bar.update(task, completed=rnd, status=round_status(row))

            try:
                run_dir = run_local(experiment, set_, nodes, data_files, progress, timeout)
            except KeyboardInterrupt:
                console.print("interrupted: stopped the SuperLink and SuperNodes; finished rounds "
                              "are kept in the run directory")
                raise typer.Exit(code=130) from None
    console.print(_summary_table(pd.read_parquet(run_dir / "rounds.parquet")))
    console.print(f"run directory: {run_dir}  (deployment logs: {run_dir / 'deployment' / 'logs'})",
                  soft_wrap=True)


@app.command()
def pretrain(
    experiment: Annotated[Path, typer.Argument(help="experiment spec (TOML) with data.holdout > 0")],
    out: Annotated[Path | None, typer.Option(
        help="the state dict to write (default: the spec's model.init, else pretrained.pt)")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the held-out rows")] = 5,
    set_: Annotated[list[str], typer.Option(
        "--set", help="override a key: --set data.holdout=0.1")] = [],  # noqa: B006
) -> None:
    """Train the experiment's model centrally on the training rows its federation leaves out
    (data.holdout) and save it for model.init (and its feature extractor for data.embedding)."""
    from fedsim.config import load_config
    from fedsim.pretrain import pretrain as run_pretraining

    with user_errors():
        config = load_config(experiment, set_)
        result = run_pretraining(config, out, epochs)
    typer.echo(f"pretrained on {result.examples} held-out examples: test accuracy "
               f"{result.test_accuracy:.4f}, train loss {result.train_loss:.4f}")
    typer.echo(f"weights: {result.weights}  (model.init)")
    if result.encoder is not None:
        typer.echo(f"encoder: {result.encoder}  (data.embedding)")


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="comparison folders or run directories")],
    out: Annotated[Path, typer.Option(help="the HTML file (its summary table goes beside it as CSV)")]
    = Path("report.html"),
    title: Annotated[str, typer.Option(help="the report's title")] = "fedsim report",
    target: Annotated[float | None, typer.Option(
        help="test accuracy for 'rounds to target' (default: 90% of the best final accuracy)")] = None,
) -> None:
    """(Re)build one self-contained HTML report from stored results only."""
    from fedsim.report import build_report

    try:
        written = build_report(paths, out, title, target)
    except (FileNotFoundError, KeyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    console.print(f"report: {written}  (table: {written.with_suffix('.csv')})", soft_wrap=True)


@app.command()
def partition(
    experiment: Annotated[Path, typer.Argument(help="experiment spec (TOML)")],
    set_: Annotated[list[str], typer.Option(
        "--set", help="override a key: --set data.partition.alpha=0.1")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(
        help="heatmap image (default: <output.dir>/<name>-partition.png)")] = None,
    rows: Annotated[int, typer.Option(help="clients to list (all: 0)")] = 30,
) -> None:
    """Show how an experiment splits its data: per-client sizes and label counts, heterogeneity
    statistics, and a clients x classes heatmap."""
    from fedsim.config import load_config
    from fedsim.data import stats
    from fedsim.data.federation import build_federation
    from fedsim.registry import check_config

    with user_errors():
        config = load_config(experiment, set_)
        check_config(config)
        counts = stats.label_counts(build_federation(config.data, config.experiment.seed))
    table = stats.counts_table(counts)
    listed = table if rows <= 0 else table.head(rows)
    grid = Table(title=f"{config.data.dataset}: {config.data.partition.kind} partition "
                 f"({len(table)} clients{'' if len(listed) == len(table) else f', first {len(listed)}'})")
    for column in ["client", *table.columns]:
        grid.add_column(column.removeprefix("class_"), justify="right")
    for client_id, row in listed.iterrows():
        grid.add_row(str(client_id), *(str(v) for v in row))
    console.print(grid)
    for key, value in stats.summarize(counts).items():
        console.print(f"{key:20s} {value:.4g}")
    out = out or config.output.dir / f"{config.experiment.name}-partition.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.write_heatmap(counts, out, f"{config.data.dataset}, {config.data.partition.kind}")
    console.print(f"heatmap: {out}")


@app.command()
def strategies() -> None:
    """List the available strategies (fedsim's and Flower's) and add-ons with their parameters."""
    from fedsim.registry import ADD_ONS, METHODS
    from strategies.flower import PREFIX, flower_names

    def first_line(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    for name, cls in sorted(METHODS.items()):
        params = ", ".join(f"{k}={f.default}" for k, f in cls.Params.model_fields.items())
        typer.echo(f"{name:10s} {params or '-'}    {first_line(cls)}")
    for name, cls in sorted(ADD_ONS.items()):
        typer.echo(f"[{name}]    add-on to any strategy ({name}.enabled = true): {first_line(cls)}")
    typer.echo("Flower's strategies on fedsim's engine (constructor arguments as strategy keys):")
    typer.echo("  " + ", ".join(PREFIX + n for n in flower_names()))
    typer.echo("Your own: strategy.name = 'package.module:Class' or 'file.py:Class' (a fedsim.method.Method)")


def main() -> None:
    """Entry point of the `fedsim` console command."""
    app()


if __name__ == "__main__":
    main()
