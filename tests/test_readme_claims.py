"""README promises that no other test pins, each checked against the README's own words."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vopd_bench.cli import app
from vopd_bench.modeling import pick_device_dtype

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_benchmark_names() -> list[str]:
    section = README.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z0-9:-]+)`", line)
        if m:
            names.append(m.group(1))
    return names


def test_vopd_benchmarks_lists_every_benchmark_of_the_readme_table():
    names = _readme_benchmark_names()
    assert len(names) == 11 and names[0] == "synthetic" and "pope" in names  # the table was read
    res = CliRunner().invoke(app, ["benchmarks"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    listed = set(re.findall(r"[a-z0-9][a-z0-9-]*", res.output))
    assert not [n for n in names if n not in listed], res.output
    # the table's grouped rows: `hrbench-4k`, `hrbench-8k` and the MME-RealWorld variants
    for name in ("hrbench-8k", "mme-realworld-cn", "mme-realworld-lite"):
        assert name in listed, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU half of the claim; a GPU gets bf16")
def test_hf_dtype_is_fp32_on_a_cpu():
    assert "bf16 on a GPU, fp32 on a CPU" in README
    assert pick_device_dtype() == ("cpu", torch.float32)
    assert pick_device_dtype("cpu", "auto") == ("cpu", torch.float32)
    assert pick_device_dtype("cpu", "bfloat16") == ("cpu", torch.bfloat16)  # an explicit choice is kept


def test_remote_code_is_off_unless_asked():
    import typer

    assert "Models never run their own hub code unless you pass `--trust-remote-code`." in README
    command = typer.main.get_command(app).commands["gap-report"]
    [option] = [p for p in command.params if p.name == "trust_remote_code"]
    assert "--trust-remote-code" in option.opts and option.default is False
