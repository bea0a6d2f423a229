#!/usr/bin/env bash
# Set up one of the two supported vLLM layouts (README § vLLM).
#
#   benchmarks/vllm_setup.sh beside DIR   one venv with vopd and vLLM 0.33.0 (vLLM chooses torch/transformers);
#                                         needed for --rollout-engine vllm and --backend vllm
#   benchmarks/vllm_setup.sh server DIR   a venv with vLLM alone; it prints the `vllm serve` command and the
#                                         matching `vopd gap-report --backend openai` for vopd's own environment
set -euo pipefail
cd "$(dirname "$0")/.."
layout=${1:?usage: vllm_setup.sh beside|server DIR}
dir=${2:?usage: vllm_setup.sh beside|server DIR}
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
case "$layout" in
    beside)
        "$dir/bin/pip" install -q -e '.[vllm]'
        "$dir/bin/python" -c "import vllm, torch, transformers, vopd_bench; print('vllm', vllm.__version__,
'| torch', torch.__version__, '| transformers', transformers.__version__)"
        echo "ready: $dir/bin/vopd gap-report MODEL --backend vllm"
        ;;
    server)
        "$dir/bin/pip" install -q 'vllm==0.33.0'
        echo "start:  $dir/bin/vllm serve MODEL --port 8000 --generation-config vllm"
        echo "then:   vopd gap-report MODEL --backend openai --base-url http://localhost:8000/v1"
        ;;
    *) echo "unknown layout $layout: beside or server" >&2; exit 2 ;;
esac
