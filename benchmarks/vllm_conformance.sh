#!/usr/bin/env bash
# Check vopd's vLLM calls (and the fakes its tests use) against a real vLLM, in an environment of vLLM's own.
#
#   benchmarks/vllm_conformance.sh [ENV_DIR] [VLLM_VERSION]     (defaults: .vllm-env, 0.33.0)
#
# vLLM pins its own torch and transformers, so it gets a separate virtual environment (created here unless
# ENV_DIR already has a python with vLLM). vopd is not installed there: tests/test_vllm_conformance.py imports it
# from this checkout through PYTHONPATH, and its imports are light (no model is loaded). No GPU is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=${1:-.vllm-env}
version=${2:-0.33.0}

if ! "$env_dir/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$env_dir"
    "$env_dir/bin/pip" install -q --upgrade pip
    "$env_dir/bin/pip" install -q "vllm==$version"
fi
"$env_dir/bin/python" -c "import pytest" 2>/dev/null || "$env_dir/bin/pip" install -q pytest

"$env_dir/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__,
'| transformers', transformers.__version__)" 2>/dev/null
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
    "$env_dir/bin/python" -m pytest -q -p no:cacheprovider -rs tests/test_vllm_conformance.py
