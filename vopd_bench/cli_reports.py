"""`vopd leaderboard`, `vopd compare` and `vopd focus-layers`: reports across and about runs. The main `vopd` app
merges these commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vopd_bench.cli_help import VopdCommand

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console()


@app.command("leaderboard", cls=VopdCommand)
def leaderboard_cmd(
    report_dirs: list[Path] = typer.Argument(..., help="gap-report output folders (each with summary.csv and "
                                                       "run.json), one leaderboard row each."),
    out: Path = typer.Option(Path("runs/leaderboard.csv"), "--out", "-o",
                             help="CSV to write; leaderboard.md and leaderboard.png go next to it."),
    label: list[str] | None = typer.Option(None, "--label", "-l",
                                           help="Name of a run in tables and the chart; give one per folder, in "
                                                "order. [default: each folder's name]"),
    with_published: bool = typer.Option(False, "--with-published",
                                        help="Add the paper's published rows (Table 1 v1 and v2, Fig. 3 gaps), "
                                             "labelled as published and never mixed into measured numbers."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on the terminal."),
) -> None:
    """One row per run: accuracy per benchmark and view, the gaps, n and CI half-widths, the paper's average."""
    import pandas as pd

    from vopd_bench.leaderboard import benchmarks_of, leaderboard

    df, files = leaderboard(report_dirs, out, with_published=with_published, labels=label or ())
    if not quiet:
        measured = df[df["source"] == "measured"]
        table = Table(title="Leaderboard, measured (accuracy %, gap pp)")
        for col in ("run", "benchmark", "full", "crop", "box", "gap", "n"):
            table.add_column(col, justify="left" if col in ("run", "benchmark") else "right")

        def cell(v: object, signed: bool = False) -> str:
            if v is None or v != v:
                return "–"
            return f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}"

        for _, r in measured.iterrows():
            for bench in benchmarks_of(measured):
                if pd.isna(r.get(f"{bench}:n")):
                    continue
                table.add_row(str(r["label"]), bench, *(cell(r.get(f"{bench}:{v}")) for v in ("full", "crop", "box")),
                              cell(r.get(f"{bench}:gap"), signed=True), str(int(r[f"{bench}:n"])))
        console.print(table)
        n_pub = int((df["source"] == "published").sum())
        if n_pub:
            console.print(f"+ {n_pub} published rows from the paper (see {files['md']})")
        console.print("Wrote " + ", ".join(str(p) for p in files.values()))


@app.command("compare", cls=VopdCommand)
def compare_cmd(
    a: Path = typer.Argument(..., help="Run A: a gap-report folder (e.g. before distillation)."),
    b: Path = typer.Argument(..., help="Run B: a gap-report folder (e.g. after distillation)."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Output folder. [default: runs/compare/<A>_vs_<B>/]"),
    label_a: str | None = typer.Option(None, help="Name of run A in tables and plots. [default: its folder's name]"),
    label_b: str | None = typer.Option(None, help="Name of run B. [default: its folder's name]"),
    seed: int = typer.Option(0, help="Seed of the paired bootstrap."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on the terminal."),
) -> None:
    """Paired differences B − A on the samples both runs share: accuracy per view and the gaps, with 95% CIs
    and the exact McNemar p. Writes compare.csv, compare.md and compare.png."""
    from vopd_bench.compare import compare_dirs
    from vopd_bench.report import fmt_acc, fmt_gap, fmt_p

    res = compare_dirs(a, b, out, label_a=label_a, label_b=label_b, n_boot=n_boot, seed=seed)
    if not quiet:
        table = Table(title=f"{res.label_a} → {res.label_b} (shared samples)")
        for col in ("benchmark", "metric", "A", "B", "B − A [95% CI]", "n", "McNemar p"):
            table.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
        for r in res.table[res.table["category"] == "all"].itertuples(index=False):
            fmt = fmt_acc if r.metric.startswith("acc_") else fmt_gap
            table.add_row(r.benchmark, r.metric, fmt(r.a), fmt(r.b), fmt_gap(r.diff, r.ci_low, r.ci_high),
                          str(int(r.n)), fmt_p(r.mcnemar_p))
        console.print(table)
        for name, only in (("A", res.only_a), ("B", res.only_b)):
            if only:
                console.print(f"only in {name}, not compared: {', '.join(only)}")
        console.print("Wrote " + ", ".join(str(p) for p in res.files.values()))


@app.command("focus-layers", cls=VopdCommand)
def focus_layers_cmd(
    report_dir: Path = typer.Argument(..., help="A gap-report folder run with --focus, ideally on a validation split "
                                                "with evidence boxes (e.g. `-b synthetic:validation`)."),
    view: str = typer.Option("full", help="The view whose records are read."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the best layer's line, no table."),
) -> None:
    """Per language-model layer, how much more of the answer position's image attention falls on the evidence
    than a uniform spread would put there (mean share − area, 95% CI): pass the best layer to --focus-layer."""
    from vopd_bench.errors import VopdError
    from vopd_bench.focus import layer_profile
    from vopd_bench.store import RecordStore

    path = report_dir / "samples.jsonl"
    if not path.is_file():
        raise VopdError(f"{path} not found: give a gap-report folder")
    rows = layer_profile(list(RecordStore(path).records.values()), view, seed=seed)
    if not rows:
        raise VopdError(f"no {view} record in {path} has a focus share: run gap-report with --focus on a benchmark "
                        "with evidence boxes")
    best = max(rows, key=lambda r: r["lift"])
    table = Table(title=f"Attention on the evidence by layer ({view} view, share − area)")
    for col in ("layer", "lift [95% CI]", "n"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " ←" if r is best else ""
        table.add_row(str(r["layer"]), f"{r['lift']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]{mark}", str(r["n"]))
    if not quiet:
        console.print(table)
    console.print(f"highest: layer {best['layer']} (--focus-layer {best['layer']})")
