"""A full disk is one line: `vopd gap-report` and `vopd distill` writing to a small tmpfs stop with one line naming
the folder and what to do (never a traceback), exit 1, and the same command, once the disk has room, resumes to
the result of an uninterrupted run.

The disk is a real tmpfs (`mount -t tmpfs -o size=...`), so the errors are the kernel's own ENOSPC, met wherever
the code happens to write: records, reports, safetensors states. Mounting needs root (CI runs as root); elsewhere
the tests skip, saying so. How much room each run gets is derived from an uninterrupted run's own files, so the
disk fills at the step the test names whatever those files weigh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vopd_bench.errors import VopdError, write_error, writing_to


class SmallDisk:
    """A tmpfs of `size_kb` at `path`, with a filler file to leave exactly the room a test wants."""

    def __init__(self, path: Path, size_kb: int):
        self.path, self.filler, self.mounted = path, path / "filler", False
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            path.rmdir()
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): the full-disk tests "
                        "need root, as on CI")
        self.mounted = True

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def leave(self, room: int) -> None:
        """Fill the disk until `room` bytes are left."""
        with self.filler.open("ab") as f:
            f.write(b"\0" * max(0, self.free() - room))

    def make_room(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    disks: list[SmallDisk] = []

    def make(size_kb: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size_kb))
        return disks[-1]

    yield make
    for d in disks:
        d.unmount()


def vopd(capfd, *args: str) -> tuple[int, str, str]:
    """`vopd ARGS` through the CLI's own entry point, in this process: (exit code, stdout, stderr). An exception
    that escapes `main` (what would be a traceback) fails the test."""
    from vopd_bench.cli import main

    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["vopd", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_about(err: str, folder: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: cannot write to {folder}") and "No space left on device" in lines[0], err
    assert "rerun the same command to resume" in lines[0], err


GAP_REPORT = ("gap-report", "toy", "--limit", "6", "-q")


@pytest.fixture(scope="module")
def uninterrupted_gap_report(tmp_path_factory):
    from vopd_bench.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    argv, sys.argv = sys.argv, ["vopd", *GAP_REPORT, "--out", str(out)]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = argv
    return out


@pytest.mark.parametrize("fills_during", ["records", "reports"])
def test_gap_report_on_a_full_disk_is_one_line_and_resumes_to_the_same_summary(small_disk, capfd, fills_during,
                                                                              uninterrupted_gap_report):
    straight = uninterrupted_gap_report
    records = (straight / "samples.jsonl").stat().st_size
    disk = small_disk(1200)
    out = disk.path / "run"
    # records: room for a third of the answers; reports: every answer fits, the HTML report does not
    disk.leave(records // 3 if fills_during == "records" else records + 16 * 1024)
    code, _, err = vopd(capfd, *GAP_REPORT, "--out", str(out))
    assert code == 1
    assert_one_line_about(err, out)
    saved = (out / "samples.jsonl").read_bytes() if (out / "samples.jsonl").exists() else b""
    answers = (straight / "samples.jsonl").read_bytes().count(b"\n")
    if fills_during == "records":
        assert saved.count(b"\n") < answers and not (out / "summary.csv").exists()
    else:  # every answer saved (fsynced batch by batch), the reports cut short
        assert saved.count(b"\n") == answers and not (out / "run.json").exists()
    assert not list(out.glob("*.tmp"))  # a half-written copy gives its space back

    disk.make_room()
    code, _, err = vopd(capfd, *GAP_REPORT, "--out", str(out))
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(straight / "summary.csv"))
    keys = [line.split('"key":"', 1)[1][:32] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len((straight / "samples.jsonl").read_text().splitlines())


@pytest.mark.parametrize("command", ["leaderboard", "compare"])
def test_leaderboard_and_compare_on_a_full_disk_are_one_line(small_disk, capfd, command, uninterrupted_gap_report):
    run = str(uninterrupted_gap_report)
    disk = small_disk(1200)
    disk.leave(8 * 1024)  # room for the CSV, not for the figure
    out = disk.path / "out"
    args = [run, "--out", str(out / "leaderboard.csv")] if command == "leaderboard" else [run, run, "--out", str(out)]
    code, _, err = vopd(capfd, command, *args, "-q")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write to {out}: No space left on device") and err.strip().endswith(
        "then rerun the command"), err
    disk.make_room()
    assert vopd(capfd, command, *args, "-q")[0] == 0


DISTILL_CONFIG = ("data: synthetic:train\ndata-limit: 4\nbatch-size: 2\nmicro-batch-size: 2\nsteps: 4\n"
                  "save-every: 2\neval-every: null\nremeasure: false\nquiet: true\n")


def test_distill_on_a_full_disk_is_one_line_and_resumes_to_the_same_weights(small_disk, capfd, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(DISTILL_CONFIG)
    straight = tmp_path / "straight"
    code, _, err = vopd(capfd, "distill", "toy", "--config", str(config), "--out", str(straight))
    assert code == 0, err
    state = sum(f.stat().st_size for f in (straight / "state").iterdir())
    # Room for one state and a half: the save at step 2 fits, the one at step 4 (written beside it before the
    # swap) does not. safetensors reports that as its own SafetensorError, not an OSError.
    disk = small_disk(3 * state // 2 // 1024 + 64)
    out = disk.path / "run"
    code, _, err = vopd(capfd, "distill", "toy", "--config", str(config), "--out", str(out))
    assert code == 1
    assert_one_line_about(err, out)
    assert (out / "state" / "trainer_state.json").is_file() and not (out / "state.tmp").exists()
    assert not (out / "model").exists()

    moved = tmp_path / "moved"  # the folder, moved to a disk with room
    shutil.copytree(out, moved)
    disk.unmount()
    code, said, err = vopd(capfd, "distill", "toy", "--config", str(config), "--out", str(moved))
    assert code == 0, err
    assert f"resuming {moved} at step 2/4" in said
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(moved / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [line for line in (moved / "train_log.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(steps) == 4


def test_only_failed_writes_are_translated(tmp_path):
    """A full disk anywhere, a failure on a file inside the output folder and safetensors' wrapped I/O error
    become one line; any other OSError (a missing input file, a refused connection) passes unchanged."""
    from safetensors import SafetensorError

    full = OSError(28, "No space left on device")
    assert "cannot write to /out: No space left on device. Free some space" in str(write_error(full, "/out"))
    inside = PermissionError(13, "Permission denied", "/out/run.json")
    assert str(write_error(inside, "/out")).startswith("cannot write to /out (run.json): Permission denied. Make the")
    wrapped = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(write_error(wrapped, "/out")).startswith("cannot write to /out: No space left on device. Free")
    elsewhere = OSError(28, "No space left on device", "/cache/x")
    assert str(write_error(elsewhere, "/out")).startswith("cannot write to /cache/x: No space left on device")
    for other in (FileNotFoundError(2, "No such file or directory", "/data/in.jsonl"), ConnectionRefusedError(111, "x"),
                  SafetensorError("Error while deserializing header: HeaderTooLarge"), ValueError("x")):
        assert write_error(other, "/out") is None
        with pytest.raises(type(other)):
            with writing_to("/out"):
                raise other
    with pytest.raises(VopdError, match="then rerun the command$"):
        with writing_to("/out", resumes=False):
            raise full
