"""One writer per output folder: a second run on a busy folder is refused with one line naming the holder; the
lock goes away with its process, SIGKILL included; the ranks of one torchrun job share it, other jobs do not."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vopd_bench.errors import VopdError
from vopd_bench.folder_lock import LOCK_NAME, output_lock, torchrun_job

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_holder_is_refused_naming_the_first_and_the_folder_frees_on_exit(tmp_path):
    with output_lock(tmp_path / "out") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["job"] is None
        with pytest.raises(VopdError) as e:
            with output_lock(tmp_path / "out"):
                pass
        msg = str(e.value)
        assert f"pid {os.getpid()}: " in msg and "in use by another vopd run" in msg and "\n" not in msg
    with output_lock(tmp_path / "out"):  # released on exit
        pass
    with output_lock(tmp_path / "other"):  # another folder is independent
        with output_lock(tmp_path / "out"):
            pass


def test_an_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VopdError, match="cannot write to the output folder"):
        with output_lock(tmp_path / "file" / "out"):
            pass


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    """Nothing written: the lock file and the folders made for it go; a folder that was there stays; a folder with
    anything else in it (records to resume from) stays whole."""
    for out in (tmp_path / "new" / "deep" / "out", tmp_path):
        with pytest.raises(RuntimeError, match="no such model"):
            with output_lock(out):
                raise RuntimeError("no such model")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # tmp_path itself was there before, and stays
    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "resumable"):
            (tmp_path / "resumable" / "samples.jsonl").write_text("{}\n")
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "resumable").iterdir()) == [LOCK_NAME, "samples.jsonl"]
    with output_lock(tmp_path / "finished"):  # a run that ends well keeps its folder, even if it wrote nothing
        pass
    assert (tmp_path / "finished" / LOCK_NAME).is_file()


def test_a_lock_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    """A second run that opened the lock file just before a failing first run removed it must not count a lock
    on that file, now in no folder: it locks the folder's new file."""
    import vopd_bench.folder_lock as fl

    real_open, calls = fl._open, []

    def open_then_lose(folder, path):
        fd = real_open(folder, path)
        calls.append(fd)
        if len(calls) == 1:  # the first run gives up and removes its files between our open and our lock
            path.unlink()
            folder.rmdir()
        return fd

    monkeypatch.setattr(fl, "_open", open_then_lose)
    with output_lock(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(calls) == 2


def test_the_lock_dies_with_a_killed_process(tmp_path):
    holder = _python(f"""
        import time
        from vopd_bench.folder_lock import output_lock
        with output_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(600)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(VopdError, match=rf"pid {holder.pid}: "):
            with output_lock(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with output_lock(tmp_path) as lock:  # no stale lock: the kernel released it with the process
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def _rank(rank: int, job: str = "abc", port: str = "29500") -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "TORCHELASTIC_RUN_ID": job,
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def test_torchrun_job_identity():
    assert torchrun_job({}) is None
    assert torchrun_job({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a single process is just a run
    assert torchrun_job(_rank(1)) == (1, "abc@127.0.0.1:29500")
    assert torchrun_job(_rank(1, job="none", port="29501")) != torchrun_job(_rank(1, job="none"))


def test_ranks_of_one_torchrun_job_share_the_folder_and_other_jobs_are_refused(tmp_path):
    with output_lock(tmp_path, env=_rank(0)):
        with output_lock(tmp_path, env=_rank(1), rank_wait_s=2):  # same job: shares
            pass
        with pytest.raises(VopdError, match="in use by another vopd run"):
            with output_lock(tmp_path, env=_rank(1, port="29600"), rank_wait_s=2):  # another job's rank 1
                pass
        with pytest.raises(VopdError, match="in use by another vopd run"):
            with output_lock(tmp_path, env=_rank(0, port="29600")):  # another job's rank 0
                pass
    with output_lock(tmp_path):  # a plain run that is not a rank blocks every rank of a job
        with pytest.raises(VopdError, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path, env=_rank(1), rank_wait_s=2):
                pass
    # a rank whose rank 0 never takes the lock gives up after its wait, with one line
    with pytest.raises(VopdError, match="rank 0 of this torchrun job did not take the output lock"):
        with output_lock(tmp_path, env=_rank(1), rank_wait_s=0.3):
            pass


def test_a_second_gap_report_on_a_busy_folder_is_refused_and_the_first_finishes_without_duplicates(
        tmp_path, monkeypatch, capsys):
    from vopd_bench import cli

    out, go = tmp_path / "out", tmp_path / "go"
    # The first run's backend waits for the `go` file, so the second starts while the first certainly holds the
    # folder, whatever the machine's speed.
    first = _python(f"""
        import time
        from pathlib import Path
        from vopd_bench.backends.base import Response
        from vopd_bench.runner import GapReportConfig, run_gap_report

        class WaitingBackend:
            name, preferred_batch_size = "waiting", 4
            def fingerprint(self):
                return "waiting"
            def generate(self, requests, gen):
                while not Path({str(go)!r}).exists():
                    time.sleep(0.05)
                return [Response("A", tokens=1) for _ in requests]
            def close(self):
                pass

        cfg = GapReportConfig(model="waiting", limit=4, out={str(out)!r}, quiet=True)
        print(len(run_gap_report(cfg, backend=WaitingBackend()).records), flush=True)
    """)
    try:
        lock = out / LOCK_NAME
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        # the second run: the command's own entry point, in this process (the first holds the lock in its own)
        monkeypatch.setattr(sys, "argv", ["vopd", "gap-report", "toy", "--limit", "4", "--out", str(out), "-q"])
        monkeypatch.setenv("COLUMNS", "400")
        with pytest.raises(SystemExit) as second:
            cli.main()
        assert second.value.code == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}: " in lines[0] and "in use by another vopd run" in lines[0]
        assert "Traceback" not in err
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        first.kill()
    assert stdout.strip() == "12"  # 4 samples × 3 views
    keys = [json.loads(line)["key"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12


def test_distill_holds_the_same_lock_on_its_out(tmp_path):
    from vopd_train.cli import run_distill
    from vopd_train.config import DistillConfig

    cfg = DistillConfig(model="toy", data="synthetic:train", out=str(tmp_path))
    with output_lock(tmp_path):
        with pytest.raises(VopdError, match=f"in use by another vopd run \\(pid {os.getpid()}: "):
            run_distill(cfg)
