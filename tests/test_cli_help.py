"""`--help` tells the truth: every command's help, rendered at 100 columns as a terminal would show it, names every
option in full, shows every default, shows no value placeholder after a flag, and keeps bracketed text; every
command takes -q/--quiet; `vopd distill --help` sorts its options into panels; `vopd --version` works."""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vopd_bench.cli import _register_commands, app
from vopd_train.config import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 100
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The panels of `vopd distill --help`, in order ("Options" holds --config and --help).
DISTILL_PANELS = ["Arguments", "Options", "Data", "Model", "Rollouts", "Loss", "Teacher", "Optimiser", "Evaluation",
                  "Scale", "vLLM", "Output"]


def _commands() -> dict:
    _register_commands()
    return typer.main.get_command(app).commands


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": None,
                                                          "FORCE_COLOR": None, "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return ANSI.sub("", res.output)


def _rows(text: str, panel_of: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The option rows of a rendered help, by their first long name, each row's lines joined with single spaces;
    and the panel titles in order. `panel_of`, when given, gets each option's panel."""
    rows: dict[str, str] = {}
    panels: list[str] = []
    current = None
    for line in text.splitlines():
        title = re.match(r"^╭─ (.+?) ─", line)
        if title:
            panels.append(title.group(1))
            current = None
            continue
        if not line.startswith("│"):
            continue
        assert len(line) <= WIDTH, line
        body = line.strip().strip("│")
        start = re.match(r"^ (?:\*\s+)?(--[\w-]+)", body)
        if start:
            current = start.group(1)
            rows[current] = body
            if panel_of is not None:
                panel_of[current] = panels[-1]
        elif current is not None:
            rows[current] += " " + body
    return {k: " ".join(v.split()) for k, v in rows.items()}, panels


def _long_name(param) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def _is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False))


def _distill_default(f) -> str:
    """What the help must show for a DistillConfig field, written out here, not taken from vopd_train.cli."""
    value = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(value, bool):
        return f.name.replace("_", "-") if value else "no-" + f.name.replace("_", "-")
    return "none" if value in (None, "") else str(value)


def test_every_command_shows_every_option_in_full_with_its_default():
    commands = _commands()
    assert {"gap-report", "benchmarks", "check", "leaderboard", "compare", "distill"} <= set(commands)
    distill_fields = {f.name: f for f in fields(DistillConfig)}
    for name, command in commands.items():
        text = _help(name)
        assert "…" not in text, f"{name}: a cut name or text\n{text}"
        assert "<bool>" not in text, f"{name}: a flag shows a value placeholder\n{text}"
        rows, _ = _rows(text)
        for param in command.params:
            if not isinstance(param, typer.core.TyperOption) or param.name == "help":
                continue
            flag = _long_name(param)
            assert flag in rows, f"{name} {flag}: no row starts with the option's full name\n{text}"
            row = rows[flag]
            for bracketed in re.findall(r"\[[^\]]*\]", " ".join((param.help or "").split())):
                assert bracketed in row, f"{name} {flag}: {bracketed!r} lost from the help"
            if name == "distill" and param.name in distill_fields:
                f = distill_fields[param.name]
                want = "[required]" if param.name in ("data", "out") else f"[default: {_distill_default(f)}]"
                assert want in row, f"distill {flag}: {want} missing in {row!r}"
            elif _is_flag(param) and not param.secondary_opts:
                assert param.default is False, f"{name} {flag}: a switch must be off unless given"
            elif param.default is not None and not _is_flag(param):
                assert f"[default: {param.default}]" in row, f"{name} {flag}: default missing in {row!r}"
            elif name != "distill" or param.name != "config":
                assert "[default: " in row, f"{name} {flag}: no default shown in {row!r}"


def test_every_command_takes_q_for_quiet():
    for name, command in _commands().items():
        quiet = [p for p in command.params if "--quiet" in p.opts]
        assert quiet and "-q" in quiet[0].opts, f"{name} has no -q/--quiet"


def test_distill_sorts_every_option_into_a_panel():
    command = _commands()["distill"]
    by_name = {p.name: p for p in command.params}
    for f in DistillConfig.option_fields():
        panel = getattr(by_name[f.name], "rich_help_panel", None)
        assert panel in DISTILL_PANELS[2:], (f"--{f.name.replace('_', '-')} has no panel: add it to PANELS in "
                                             "vopd_train/cli.py")
    _, panels = _rows(_help("distill"))
    assert panels == DISTILL_PANELS


def test_gap_report_sorts_every_option_into_a_panel():
    """Its options are long too: each belongs to a named panel (GAP_REPORT_PANELS in vopd_bench/cli.py), so the
    plain "Options" panel holds --help alone."""
    panel_of: dict[str, str] = {}
    _rows(_help("gap-report"), panel_of)
    unsorted = sorted(name for name, panel in panel_of.items() if panel == "Options" and name != "--help")
    assert unsorted == [], f"add {unsorted} to GAP_REPORT_PANELS in vopd_bench/cli.py"
    assert {"What is asked", "Output", "Backend", "Judge"} <= set(panel_of.values())


def test_a_hard_wrapped_docstring_prints_as_one_paragraph():
    text = _help("check")
    assert "One line per capability (load, gap-report, distill full, distill LoRA," in " ".join(text.split())


def test_version():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"vopd {want}\n"


@pytest.mark.parametrize("args", [["benchmarks", "-q"], ["benchmarks"]])
def test_benchmarks_lists_which_have_evidence(args):
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    if "-q" in args:
        names = res.output.split()
        assert {"synthetic", "vstar", "vstar@lmms", "local:PATH", "pope"} <= set(names)
        return
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│")}
    for name in ("synthetic", "vstar", "treebench", "zoombench", "local:PATH"):
        assert rows[name][1] != "–", (name, rows[name])  # evidence
    for name in ("pope", "mmstar", "hrbench-4k", "cv-bench"):
        assert rows[name][1] == "–", (name, rows[name])
    assert rows["vstar"][0] == "@lmms"


def test_distill_q_is_quiet(monkeypatch, tmp_path):
    import vopd_train.cli as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "run_distill", lambda cfg, preset: seen.append(cfg))
    _commands()
    for flags, quiet in ((["-q"], True), ([], False)):
        res = CliRunner().invoke(app, ["distill", "toy", "--data", "synthetic:train", "--out", str(tmp_path), *flags])
        assert res.exit_code == 0, res.output
        assert seen.pop().quiet is quiet
