#!/usr/bin/env bash
# The real vLLM paths on one GPU, in under 8 minutes (NOT RUN YET: no GPU has been available to this project).
#
#   benchmarks/vllm_gpu_check.sh [OUT_DIR]        (in an environment with vopd and vLLM, e.g. README § vLLM)
#
# 1. gap-report on the toy with --backend vllm and with --backend hf: the answers must be identical (greedy, one
#    decoding policy for both backends).
# 2. 20 distill steps with --rollout-engine vllm --importance-weight on a random-initialised Qwen2.5-VL-class
#    checkpoint (vopd's tiny builder): the weight sync, the sleep/wake cycle and the importance weight for real.
# 3. Rollout tokens/s, vLLM against transformers generate (benchmarks/vllm_rollout_speed.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
py=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
"$py" -c "import vllm, torch; print('vllm', vllm.__version__, '| torch', torch.__version__, '|',
torch.cuda.get_device_name())"

echo "== 1. gap-report: vllm against hf on the toy"
timeout 150 "$py" -m vopd_bench.cli gap-report toy --limit 40 --backend hf --out "$out/hf" --quiet
timeout 200 "$py" -m vopd_bench.cli gap-report toy --limit 40 --backend vllm --out "$out/vllm" --quiet
"$py" - "$out/hf/samples.jsonl" "$out/vllm/samples.jsonl" <<'PY'
import json
import sys

def answers(path):
    rows = [json.loads(line) for line in open(path)]
    return {(r["benchmark"], r["sample_id"], r["view"]): (r["response"], r["error"]) for r in rows}

hf, vllm = answers(sys.argv[1]), answers(sys.argv[2])
same = sum(hf[k] == vllm.get(k) for k in hf)
print(f"identical answers: {same}/{len(hf)} (vllm has {len(vllm)})")
sys.exit(0 if same == len(hf) == len(vllm) else 1)
PY

echo "== 2. 20 distill steps with vLLM rollouts and the importance weight"
"$py" -c "from vopd_bench.tiny.families import build_tiny; build_tiny('qwen2.5-vl', '$out/qwen25')"
timeout 180 "$py" -m vopd_bench.cli distill "$out/qwen25" --data synthetic:train --out "$out/distill" --steps 20 \
    --rollout-engine vllm --importance-weight --vllm-gpu-memory-utilization 0.3 --n-rollouts 4 --max-new-tokens 16
tail -n 3 "$out/distill"/*.jsonl 2>/dev/null || ls "$out/distill"

echo "== 3. rollout tokens/s, vLLM against HF"
timeout 150 "$py" benchmarks/vllm_rollout_speed.py "$out/qwen25"
