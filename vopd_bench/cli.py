"""The `vopd` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vopd_bench.cli_help import VopdCommand, VopdGroup, with_panels
from vopd_bench.errors import VopdError, write_error

app = typer.Typer(
    name="vopd",
    cls=VopdGroup,
    help="Measure and close the regional-to-global perception gap of multimodal LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
DEFAULT_OUT = "runs/<model-slug>/"  # gap-report's output folder; git ignores runs/ (runner.GapReportConfig.out_dir)


def version_text() -> str:
    """`vopd 0.1.0`: the installed distribution's version, or the source tree's when vopd is not installed."""
    from importlib import metadata

    from vopd_bench import __version__

    try:
        return f"vopd {metadata.version('vopd')}"
    except metadata.PackageNotFoundError:
        return f"vopd {__version__}"


def _show_version(value: bool) -> None:
    if value:
        console.print(version_text(), highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print vopd's version and exit."),
) -> None:
    """Measure and close the regional-to-global perception gap of multimodal LLMs."""


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# The panels of `vopd gap-report --help`, by parameter name.
GAP_REPORT_PANELS = {
    "What is asked": ("benchmarks", "views", "limit", "max_new_tokens", "seed", "no_thinking", "crop_context",
                      "crop_min_side", "crop_zoom", "data_dir", "max_image_pixels"),
    "Focus and selfcrop": ("focus", "focus_layer", "selfcrop_method", "selfcrop_window"),
    "Output": ("out", "force", "quiet"),
    "Backend": ("backend", "batch_size", "trust_remote_code", "threads", "tensor_parallel_size", "max_model_len",
                "vllm_dtype", "base_url", "model_name", "api_key_env", "concurrency", "request_timeout",
                "image_format"),
    "Judge": ("judge_base_url", "judge_model", "judge_api_key_env"),
}


@app.command("gap-report", cls=with_panels(GAP_REPORT_PANELS))
def gap_report(
    model: str = typer.Argument(..., help="Model to evaluate: `toy` (the built-in tiny VLM), a local folder, or a hub id."),
    benchmarks: str = typer.Option("synthetic", "--benchmarks", "-b",
                                   help="Comma-separated benchmarks, e.g. `synthetic,vstar` or `local:data/my.jsonl`. "
                                        "`vopd benchmarks` lists them."),
    views: str = typer.Option("full,crop,box", help="Comma-separated views: full, crop (evidence crop), box (full "
                                                     "image with the evidence outlined in red, plus the paper's hint), "
                                                     "selfcrop (the window the model's own attention picks, shown "
                                                     "as --selfcrop-method says; hf backend)."),
    limit: int | None = typer.Option(None, help="Ask at most this many samples per benchmark. [default: all]"),
    backend: str = typer.Option("hf", help="Backend: hf (transformers), vllm (offline engine) or openai "
                                            "(any OpenAI-compatible server)."),
    batch_size: int = typer.Option(16, help="Requests per backend batch (hf, vllm)."),
    max_new_tokens: int = typer.Option(32, help="Longest answer generated, in tokens."),
    out: Path | None = typer.Option(None, help=f"Output folder; rerun the same command to resume it. [default: {DEFAULT_OUT}]"),
    seed: int = typer.Option(0, help="Seed for sampling, bootstrap CIs and procedural benchmarks."),
    force: bool = typer.Option(False, "--force", help="Redo samples already answered in the output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the model's own code from the hub to run. Off unless you ask."),
    crop_context: float = typer.Option(1.0, help="Crop side as a multiple of the evidence box (1.0 = tight, the paper's crop)."),
    crop_min_side: int = typer.Option(28, help="Smallest crop side in source pixels."),
    crop_zoom: float = typer.Option(2.0, help="Resize factor applied to the crop (the paper uses 2)."),
    data_dir: Path | None = typer.Option(None, help="Local copy of a hub dataset repository (same files and layout). "
                                                     "[default: none, files come from the hub]"),
    max_image_pixels: int = typer.Option(100_000_000, help="Largest image accepted, in pixels, read from its header "
                                                           "before decoding; a larger one is a sample error. The "
                                                           "default covers every supported benchmark."),
    base_url: str | None = typer.Option(None, help="openai backend: server URL, e.g. http://localhost:8000/v1. "
                                                  "[default: none, required by the openai backend]"),
    model_name: str | None = typer.Option(None, help="openai backend: the model name the server knows. "
                                                      "[default: MODEL]"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="openai backend: environment variable holding the API key."),
    concurrency: int = typer.Option(64, help="openai backend: requests in flight at once."),
    request_timeout: float = typer.Option(120.0, help="openai backend: seconds before one request is retried."),
    image_format: str = typer.Option("png", help="openai backend: how images are sent, png (lossless) "
                                                  "or jpeg (much cheaper to encode for large photographs)."),
    threads: int | None = typer.Option(None, help="hf backend on a CPU: torch threads. On a machine busy with other "
                                                    "work, 1 can be much faster. [default: torch's choice; 1 for the "
                                                    "toy]"),
    tensor_parallel_size: int = typer.Option(1, help="vllm backend: GPUs per model replica."),
    max_model_len: int | None = typer.Option(None, help="vllm backend: context length cap. [default: the model's]"),
    vllm_dtype: str | None = typer.Option(None, help="vllm backend: float32, bfloat16 or float16. [default: the dtype "
                                                      "the hf backend would use: bfloat16 on a GPU that has it, "
                                                      "else float32]"),
    no_thinking: bool = typer.Option(False, "--no-thinking",
                                     help="Pass enable_thinking=false to the chat template (Qwen3/3.5 non-thinking mode)."),
    judge_base_url: str | None = typer.Option(None, help="OpenAI-compatible server of an LLM judge for answers the "
                                                          "rules cannot decide. Without it they count as parse failures. "
                                                          "[default: none, no judge]"),
    judge_model: str | None = typer.Option(None, help="Model name of the judge. [default: none, no judge]"),
    judge_api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the judge's API key."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables: only the timings line."),
    focus: bool = typer.Option(False, "--focus", help="Also record where the model looks: the share of the answer "
                                                       "position's image attention on the evidence, beside the "
                                                       "evidence's area (focus_<view>_* rows; hf backend)."),
    focus_layer: int | None = typer.Option(None, help="The language-model layer (0-based) that --focus and the paper's "
                                                      "self-zoom read [default: the family's, e.g. 22 of 36 for "
                                                      "Qwen2.5-VL-3B]. `vopd focus-layers` helps choose it."),
    selfcrop_method: str = typer.Option("paper", help="How the selfcrop view picks its window: paper (MLLMs Know "
                                                       "Where to Look: one layer, windows from the encoder's native "
                                                       "input, full image + crop) or grid (vopd's earlier method: "
                                                       "middle layers, grid-fraction windows, zoomed crop alone)."),
    selfcrop_window: int | None = typer.Option(None, help="paper self-zoom: the smallest window side in source pixels "
                                                          "[default: the family's native input, 224 for Qwen-VL]."),
) -> None:
    """Ask every benchmark question under several views and report the regional-to-global perception gap."""
    from vopd_bench.images import set_max_pixels
    from vopd_bench.runner import GapReportConfig, run_gap_report
    from vopd_bench.views import ViewConfig

    set_max_pixels(max_image_pixels)
    if backend == "hf" and threads is None and model == "toy":
        threads = 1  # 2 are 1.28x faster idle, 4-7x slower on a busy CPU (docs/results/performance.md#threads)
    backend_options: dict = {"threads": threads} if backend == "hf" and threads else {}
    if backend == "openai":
        if not base_url:
            raise VopdError("the openai backend needs --base-url")
        backend_options = {"base_url": base_url, "model_name": model_name or model, "api_key_env": api_key_env,
                           "concurrency": concurrency, "timeout": request_timeout, "image_format": image_format}
    elif backend == "vllm":
        backend_options = {"tensor_parallel_size": tensor_parallel_size, "max_model_len": max_model_len, "seed": seed,
                           "dtype": vllm_dtype}
    judge = None
    if judge_base_url or judge_model:
        if not (judge_base_url and judge_model):
            raise VopdError("a judge needs both --judge-base-url and --judge-model")
        judge = {"base_url": judge_base_url, "model": judge_model, "api_key_env": judge_api_key_env}
    cfg = GapReportConfig(
        model=model, benchmarks=_split(benchmarks), views=tuple(_split(views)), limit=limit, backend=backend,
        batch_size=batch_size, max_new_tokens=max_new_tokens, out=str(out) if out else None, seed=seed, force=force,
        trust_remote_code=trust_remote_code, data_dir=str(data_dir) if data_dir else None, quiet=quiet,
        view_config=ViewConfig(context=crop_context, min_side=crop_min_side, zoom=crop_zoom),
        backend_options=backend_options, chat_template_kwargs={"enable_thinking": False} if no_thinking else {},
        judge=judge, focus=focus, focus_layer=focus_layer, selfcrop_method=selfcrop_method,
        selfcrop_window=selfcrop_window,
    )
    result = run_gap_report(cfg)
    if not quiet and result.summary is not None:  # under torchrun, rank 0 alone has the merged summary
        print_summary(result.summary)
        console.print(f"Report: {result.out_dir / 'report.md'}")
    console.print(result.timings.one_line(), highlight=False, soft_wrap=True)  # also with -q: one line


def print_summary(summary) -> None:
    """The end-of-run table: one row per benchmark (category `all`)."""

    from vopd_bench.report import fmt_p

    def cell(metric_rows, metric: str, pct: bool = True, ci: bool = False) -> str:
        r = metric_rows.get(metric)
        if r is None:
            return "–"
        if not pct:
            return fmt_p(r["value"])
        s = f"{100 * r['value']:.1f}"
        if ci and r["ci_low"] == r["ci_low"]:
            s += f" [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        return s

    table = Table(title="Regional-to-global perception gap (accuracy %, 95% CI)")
    for col in ("benchmark", "n", "full", "crop", "box", "gap = crop − full", "locate = box − full",
                "zoom = crop − box", "McNemar p"):
        table.add_column(col, justify="left" if col == "benchmark" else "right", no_wrap=col == "benchmark")
    rows = summary[summary["category"] == "all"]
    for bench, part in rows.groupby("benchmark", sort=False):
        m = {r["metric"]: r for r in part.to_dict("records")}
        n = m.get("acc_full", {}).get("n", "")
        table.add_row(str(bench), str(n), cell(m, "acc_full"), cell(m, "acc_crop"), cell(m, "acc_box"),
                      cell(m, "gap", ci=True), cell(m, "gap_locate", ci=True), cell(m, "gap_zoom", ci=True),
                      cell(m, "mcnemar_p", pct=False))
    console.print(table)


@app.command("benchmarks", cls=VopdCommand)
def list_benchmarks(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Names only, one a line, variants included."),
) -> None:
    """List the benchmarks vopd knows: which carry evidence (and so have the crop and box views and the gaps),
    their prompt variants, and where their data comes from."""
    from vopd_bench import benchmarks as registry

    specs = {}
    for name in registry.available():
        try:
            specs[name] = registry.resolve(name)[0]
        except VopdError:  # a benchmark that needs an argument, such as local:PATH
            name += ":PATH"
            specs[name] = registry.resolve(name)[0]
    if quiet:
        for name in specs:
            console.print(name, highlight=False)
        return
    variants: dict[str, list[str]] = {}
    for name in specs:
        base, _, variant = name.partition("@")
        variants.setdefault(base, [])
        if variant:
            variants[base].append("@" + variant)
    table = Table(title="Benchmarks: -b NAME. Those with evidence have the crop and box views and the gaps; the "
                        "others, the full view only.", title_justify="left")
    for col in ("benchmark", "variants", "evidence", "source"):
        table.add_column(col, no_wrap=col == "benchmark", overflow="fold")
    for base in sorted(variants, key=lambda b: (not specs[b].evidence, b)):  # those with evidence first
        spec = specs[base]
        table.add_row(base, ", ".join(variants[base]) or "–", spec.evidence or "–", spec.source)
    console.print(table)


def check(
    model: str = typer.Argument(..., help="Model to check: `toy`, a local folder, or a hub id."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the model's own code from the hub to run. Off unless you ask."),
    device: str | None = typer.Option(None, help="Device: auto, cpu, cuda or cuda:N. [default: auto, a GPU when there is one]"),
    threads: int | None = typer.Option(None, help="Torch threads on a CPU. [default: torch's choice]"),
    keep: Path | None = typer.Option(None, help="Keep the scratch runs in this folder. [default: a temporary one]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the capabilities that fail."),
    **plan_options,
) -> None:
    """Before a long job: does MODEL work with vopd?

    One line per capability (load, gap-report, distill full, distill LoRA, vLLM requests, vision fast path),
    each `ok` or the first line of the reason. With --plan: the per-GPU memory plan of the distill run the options
    describe (no weights loaded), and what to change if it does not fit."""
    if plan_options.get("plan"):
        from vopd_train.plan_cli import run_plan

        fits = run_plan(model, plan_options, trust_remote_code=trust_remote_code, device=device, threads=threads,
                        echo=lambda text: console.print(text, highlight=False, soft_wrap=True, markup=False))
        if not fits:
            raise typer.Exit(1)  # the plan says why; a script can stop here
        return
    if plan_options:
        from vopd_train.plan_cli import given_plan_options

        given = given_plan_options(plan_options)
        if given:
            raise VopdError(f"--{given[0].replace('_', '-')} only applies with --plan")
    from vopd_bench.check import run_check

    def show(line) -> None:
        if not (quiet and line.ok):
            console.print(line.render(), highlight=False, soft_wrap=True)

    lines = run_check(model, work_dir=keep, trust_remote_code=trust_remote_code, device=device, threads=threads,
                      on_line=show)
    failed = [line.capability for line in lines if line.required and not line.ok]
    if failed:
        raise VopdError(f"{model} failed: {', '.join(failed)}")


def _with_plan_options(command):
    """`vopd check`'s signature plus the memory plan's options (every `vopd distill` option among them) when the
    trainer is installed; `vopd_bench` on its own keeps the plain check."""
    import inspect

    try:
        from vopd_train.plan_cli import plan_params
    except ImportError:
        params = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
    else:
        params = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
        own = {p.name for p in params}  # check's own -q, --device, … stay check's
        params += [p for p in plan_params() if p.name not in own]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


app.command("check", cls=VopdCommand)(_with_plan_options(check))


def _register_commands() -> None:
    """Commands defined next to what they drive: reports here, the trainer in vopd_train."""
    from vopd_bench.cli_reports import app as reports_app

    apps = [reports_app]
    try:
        from vopd_train.cli import app as train_app

        apps.append(train_app)
    except ImportError:  # vopd_bench used on its own
        pass
    known = {c.name for c in app.registered_commands}
    for sub in apps:
        app.registered_commands.extend(c for c in sub.registered_commands if c.name not in known)
    for c in app.registered_commands:  # every command's help shows its defaults and no placeholder after a flag
        c.cls = c.cls or VopdCommand


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_commands()
    try:
        app(prog_name="vopd")
    except Exception as e:
        # a failed write outside the commands' own output folders (which name theirs): one line, not a traceback
        err = e if isinstance(e, VopdError) else write_error(e)
        if err is None:
            raise
        err_console.print(f"[bold red]error:[/] {' '.join(str(err).split())}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is saved, rerun the same command to resume")
        sys.exit(130)
    finally:
        from vopd_bench import distributed

        distributed.shutdown()


if __name__ == "__main__":
    main()
