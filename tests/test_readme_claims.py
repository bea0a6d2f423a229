"""Promises of the README and the docs pages that no other test pins, each checked against the page's own words."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vopd_bench.cli import app
from vopd_bench.modeling import pick_device_dtype

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TRAINING_GUIDE = (ROOT / "docs" / "guides" / "training.md").read_text()


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


# --------------------------------------------------------------------------------------------------------------
# gap-report's options through the real CLI, against a loopback server that records what reaches it


def test_gap_report_cli_wiring_through_a_server(tmp_path, monkeypatch, caplog):
    """One `vopd gap-report --backend openai` run checks five README promises at once: the crop flags cut the
    crop the README describes; `--no-thinking` sends `enable_thinking: false`; `--concurrency` reaches the
    backend; the API key goes only to the server, never to the output, logs or files; the default `--out` is
    `runs/<model-slug>/`."""
    import json
    import logging
    import threading

    from PIL import Image

    from vopd_bench.serve import SleepBackend, serve_backend

    seen: list[tuple[tuple[int, int], dict]] = []
    lock = threading.Lock()

    class Recorder(SleepBackend):
        def generate(self, requests, gen):
            with lock:
                seen.extend((r.image.size, gen.chat_template_kwargs) for r in requests)
            return super().generate(requests, gen)

    Image.new("RGB", (200, 100), (20, 120, 200)).save(tmp_path / "img.png")
    rows = [{"id": f"s{i}", "image": "img.png", "question": "Colour?", "options": ["red", "blue"], "answer": "B",
             "bbox": [50, 40, 60, 50]} for i in range(2)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    secret = "sk-test-7c51e0d2b3"
    monkeypatch.setenv("VOPD_TEST_KEY", secret)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    with serve_backend(Recorder(0.0), model_name="org/served-vlm", api_key=secret) as server:
        res = CliRunner().invoke(app, [
            "gap-report", "org/served-vlm", "--backend", "openai", "--base-url", server.url,
            "--api-key-env", "VOPD_TEST_KEY", "--benchmarks", "local:data.jsonl", "--concurrency", "2",
            "--no-thinking", "--crop-context", "2", "--crop-min-side", "40", "--crop-zoom", "3"],
            env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert server.stats.authorizations["bearer"] > 0 and set(server.stats.authorizations) == {"bearer"}

    # the 10x10 box doubled to 20x20, raised to 40x40 (inside the image), zoomed 3x: 120x120; full and box views
    # are the 200x100 image itself
    assert sorted(size for size, _ in seen) == [(120, 120)] * 2 + [(200, 100)] * 4
    assert all(kwargs == {"enable_thinking": False} for _, kwargs in seen)

    out = tmp_path / "runs" / "served-vlm"  # `org/served-vlm` -> its last part
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["served-vlm"]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["backend_options"]["concurrency"] == 2
    assert run["config"]["backend_options"]["api_key_env"] == "VOPD_TEST_KEY"  # the variable's name only
    assert run["config"]["view_config"] == {**run["config"]["view_config"], "context": 2.0, "min_side": 40,
                                            "zoom": 3.0}
    for name, text in [("output", res.output), ("logs", caplog.text),
                       *[(p.name, p.read_text(errors="replace")) for p in out.rglob("*") if p.is_file()]]:
        assert secret not in text, name


def test_python_m_vopd_bench_serve_answers_as_the_toy(tmp_path):
    """`python -m vopd_bench.serve toy --port P` serves the toy over HTTP: gap-report through it gets the toy's
    own greedy answers to the first two questions (read off its committed report: A, then D)."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vopd_bench.serve", "toy", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # blocks until the server says it listens (or dies: "")
        assert line.strip() == f"serving toy at http://127.0.0.1:{port}/v1 (Ctrl-C to stop)", server.stderr.read()
        out = tmp_path / "out"
        res = CliRunner().invoke(app, ["gap-report", "toy", "--backend", "openai", "--base-url",
                                       f"http://127.0.0.1:{port}/v1", "--limit", "2", "--views", "full",
                                       "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    assert code == 0  # Ctrl-C stops it cleanly
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["sample_id"], r["response"]) for r in records] == [("test-00000", "A"), ("test-00001", "D")]


def test_distill_config_file_and_the_toy_preset_through_the_cli(tmp_path):
    """`vopd distill toy --config run.yaml`: the toy preset is printed (the values still in force), the YAML
    overrides the preset, a flag overrides the YAML, and `config.yaml` records the result."""
    import json

    import yaml

    from vopd_train.cli import app as train_app

    assert "they are printed and recorded in `config.yaml`" in " ".join(TRAINING_GUIDE.split())
    config = tmp_path / "run.yaml"
    config.write_text("data: synthetic:train\ndata-limit: 2\nbatch-size: 2\nmicro_batch_size: 2\nsteps: 5\n"
                      "lr: 3.0e-4\neval-every: null\nremeasure: false\nquiet: true\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(train_app, ["distill", "toy", "--config", str(config), "--out", str(out),
                                         "--steps", "1"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    # TOY_PRESET less what the YAML or the flag changed (lr, steps, batch sizes, eval_every)
    assert ("toy preset: teacher=frozen, lora=True, n_rollouts=1, max_new_tokens=4, warmup_steps=10, topk=0, "
            "threads=1, eval_limit=128") in res.output
    assert "2 prompts (0 skipped), 1 steps, teacher frozen, LoRA" in res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lr"], saved["steps"], saved["batch_size"], saved["eval_every"]) == (3e-4, 1, 2, None)
    assert saved["teacher"] == "frozen" and saved["lora"] is True  # from the preset
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "train_log.jsonl").read_text())["step"] == 1
