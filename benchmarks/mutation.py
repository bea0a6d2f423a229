"""Mutation testing of the pure cores with mutmut: does the suite notice when the code is wrong?

Each module runs in its own scratch copy of the repository, against only the test files that exercise it, so
one module's run neither sees nor disturbs another's. mutmut is installed into the running interpreter when it
is missing (it is a development tool, not a dependency of vopd). Not part of CI: a full run takes tens of
minutes on two cores.

    .venv/bin/python benchmarks/mutation.py                          # every core
    .venv/bin/python benchmarks/mutation.py --module vopd_bench/stats.py --show-survivors
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUTMUT_REQUIREMENT = "mutmut>=3.8,<4"

# module -> the test files that exercise it; mutmut further narrows each mutant to the tests that reach it.
CORES: dict[str, list[str]] = {
    "vopd_train/losses.py": ["tests/test_losses.py"],
    "vopd_bench/stats.py": ["tests/test_stats.py"],
    "vopd_bench/scoring.py": ["tests/test_scoring.py"],
    "vopd_bench/geometry.py": ["tests/test_geometry_views.py"],
    "vopd_bench/views.py": ["tests/test_geometry_views.py"],
}


@dataclass
class ModuleResult:
    module: str
    counts: dict[str, int]
    survivors: list[str]

    @property
    def decided(self) -> int:
        return self.counts.get("killed", 0) + self.counts.get("survived", 0) + self.counts.get("timeout", 0)

    @property
    def kill_rate(self) -> float:
        # A mutant that makes the tests hang is caught too: the run would never finish green.
        caught = self.counts.get("killed", 0) + self.counts.get("timeout", 0)
        return caught / self.decided if self.decided else float("nan")


def ensure_mutmut() -> None:
    if importlib.util.find_spec("mutmut") is None:
        print(f"mutmut is not installed: installing {MUTMUT_REQUIREMENT} into {sys.prefix}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", MUTMUT_REQUIREMENT], check=True)


def scratch_copy(module: str, tests: list[str], root: Path) -> Path:
    work = root / module.replace("/", "__").removesuffix(".py")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "model")
    for package in ("vopd_bench", "vopd_train"):
        shutil.copytree(REPO / package, work / package, ignore=ignore)
    # the toy model's weights are data, not code: link them rather than copy 4 MB per module
    (work / "vopd_bench/toy/model").symlink_to(REPO / "vopd_bench/toy/model")
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", work / "pyproject.toml")
    # setup.cfg, not pyproject: the repository's pyproject stays free of a development tool's settings
    selection = "\n    ".join(tests)
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n    vopd_bench\n    vopd_train\n"
        f"only_mutate =\n    {module}\n"
        f"pytest_add_cli_args_test_selection =\n    {selection}\n"
        "pytest_add_cli_args =\n    -p\n    no:randomly\n    -q\n"
        # torch does not survive a fork from a process that has already run it
        "process_isolation = forkserver\n"
    )
    return work


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # mutmut puts its mutants/ first; a worktree on the path would shadow them
    return env


def run_module(module: str, tests: list[str], root: Path, max_children: int,
               rerun_survivors: bool = False) -> ModuleResult:
    """Mutate `module` and test every mutant; with `rerun_survivors`, reuse the last run's scratch copy, refresh
    its tests from the repository and test only the mutants that survived there (after new tests were written)."""
    work = root / module.replace("/", "__").removesuffix(".py")
    names: list[str] = []
    if rerun_survivors and (work / "mutants").is_dir():
        # survivors, timeouts (a loaded machine times out) and mutants no test reached (tests may reach them now)
        names = [n for n, status in _listing(work).items() if status in ("survived", "timeout", "no tests")]
        for dest in (work / "tests", work / "mutants" / "tests"):
            shutil.rmtree(dest)
            shutil.copytree(REPO / "tests", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if not names:
            return ModuleResult(module, *results(work))
    else:
        work = scratch_copy(module, tests, root)
    with (work / "mutmut.log").open("a") as out:
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
            cwd=work, env=_env(), stdout=out, stderr=subprocess.STDOUT, check=False,
        )
    return ModuleResult(module, *results(work))


def _listing(work: Path) -> dict[str, str]:
    """mutant name -> status, as mutmut records it."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                         cwd=work, env=_env(), capture_output=True, text=True, check=True).stdout
    return dict(m.groups() for m in re.finditer(r"(?m)^\s*(\S+): (.+)$", out))


def results(work: Path) -> tuple[dict[str, int], list[str]]:
    statuses = _listing(work)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return counts, [n for n, status in statuses.items() if status == "survived"]


def show(work: Path, name: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env, capture_output=True, text=True,
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", choices=sorted(CORES), help="repeatable; default: all")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vopd-mutation"), help="scratch directory")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--show-survivors", action="store_true", help="print the diff of each survivor")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="test only the last run's survivors (and timeouts, and mutants no test reached) "
                             "again, against the current tests")
    args = parser.parse_args()

    ensure_mutmut()
    results = []
    for module in args.module or list(CORES):
        result = run_module(module, CORES[module], args.work, args.max_children, args.rerun_survivors)
        results.append(result)
        print(f"{module}: {result.kill_rate:.1%} caught of {result.decided} "
              f"({json.dumps(result.counts, sort_keys=True)})", flush=True)
        if args.show_survivors:
            work = args.work / module.replace("/", "__").removesuffix(".py")
            for name in result.survivors:
                print(show(work, name))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))


if __name__ == "__main__":
    main()
