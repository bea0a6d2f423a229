"""The virtual environment TRL runs in for `benchmarks/trl_peer.py`: created once, outside the checkout, reused.

TRL is never a dependency of vopd. It gets its own venv, keyed by the TRL version and by every package version of
the interpreter that runs this script (vopd's development environment): that interpreter's `pip freeze` becomes
the new venv's constraints, so torch, transformers, peft, accelerate, tokenizers, numpy, Pillow, ... are the very
versions vopd runs on, and only the trainers differ. Idempotent: an existing venv with the same key is reused; a
half-built one (no `.ready` marker) is rebuilt.

    python benchmarks/trl_peer_setup.py [--root DIR] [--trl 1.16.0]     # prints the venv's python

The root defaults to $VOPD_PEER_VENVS, else ~/.cache/vopd-bench/venvs. The venv holds a full torch (several GB).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TRL_VERSION = "1.16.0"
# What the TRL peer imports besides TRL itself; the versions come from this interpreter.
NEEDED = ("torch", "torchvision", "transformers", "peft", "accelerate", "datasets", "pillow")


def frozen() -> list[str]:
    """`name==version` of every distribution this interpreter sees, sorted (vopd itself is never installed)."""
    pins = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in ("trl", "vopd", "pip", "setuptools", "wheel"):
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def venv_path(root: Path, trl: str, pins: list[str]) -> Path:
    key = hashlib.sha256("\n".join([f"trl=={trl}", sys.version.split()[0], *NEEDED, *pins]).encode()).hexdigest()[:12]
    return root / f"trl-peer-{trl}-{key}"


def default_root() -> Path:
    return Path(os.environ.get("VOPD_PEER_VENVS") or Path.home() / ".cache" / "vopd-bench" / "venvs")


def ensure(root: Path | None = None, trl: str = TRL_VERSION, quiet: bool = False) -> Path:
    """The TRL venv's python, building the venv first if it does not exist yet."""
    pins = frozen()
    venv = venv_path(root or default_root(), trl, pins)
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file() and python.is_file():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"building the TRL {trl} venv at {venv} (once; torch alone is several GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
        constraints = f.name
    try:
        names = {p.split("==")[0] for p in pins}
        wanted = [f"trl=={trl}", *[n for n in NEEDED if n in names]]
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", constraints, *wanted],
                             stderr=subprocess.PIPE, text=True)
        noise = "is ignored: it is neither a file nor a directory"  # this machine's local index lists
        sys.stderr.write("".join(line + "\n" for line in pip.stderr.splitlines() if noise not in line))
        if pip.returncode:
            raise SystemExit(f"pip could not build the TRL venv (exit {pip.returncode})")
    finally:
        os.unlink(constraints)
    check = ("import torch, transformers, peft, trl; from trl import DistillationTrainer; "
             "print(trl.__version__, torch.__version__, transformers.__version__, peft.__version__)")
    out = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    say(f"TRL venv ready: trl, torch, transformers, peft = {out}")
    (venv / ".ready").write_text("\n".join([f"trl=={trl}", *pins]) + "\n", encoding="utf-8")
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="folder for the venv (default: $VOPD_PEER_VENVS or "
                                                            "~/.cache/vopd-bench/venvs)")
    ap.add_argument("--trl", default=TRL_VERSION)
    args = ap.parse_args()
    print(ensure(args.root, args.trl))


if __name__ == "__main__":
    main()
