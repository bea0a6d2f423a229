#!/usr/bin/env bash
# The real vLLM paths on one GPU, in under 8 minutes (NOT RUN YET: no GPU has been lent to this project; the same
# paths run on a CPU in tests/real_vllm/, see docs/development/real-vllm.md).
#
#   benchmarks/vllm_gpu_check.sh [OUT_DIR]        (in an environment with vopd and vLLM: docs/guides/vllm.md)
#
# 1. gap-report on the toy with --backend vllm and with --backend hf: the answers must be identical (one
#    generation policy for both backends; bfloat16 on both sides).
# 2. The colocated path with --vllm-sleep-mode on a random ~110M-parameter Qwen2-VL (benchmarks/
#    vllm_colocate_check.py): 8 distill steps, importance weights asserted in [0.98, 1.02], the engine's greedy
#    answers checked against transformers' after every sync, GPU memory printed per phase (next to
#    `vopd check --plan` where that command exists).
# 3. 20 steps of `vopd distill --rollout-engine vllm --vllm-sleep-mode` on the tiny Qwen2.5-VL: the command itself,
#    its exit without a traceback.
# 4. Rollout tokens/s, vLLM against transformers generate (benchmarks/vllm_rollout_speed.py), on the medium model.
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

echo "== 2. the colocated path with sleep mode: importance weights, sync agreement, memory per phase"
"$py" -c "import sys; sys.path.insert(0, 'benchmarks'); from vllm_rollout_speed import build; build('medium', '$out/medium')"
timeout 200 "$py" benchmarks/vllm_colocate_check.py "$out/medium" "$out/colocate" --steps 8 --bucket-mb 64

echo "== 3. vopd distill --rollout-engine vllm --vllm-sleep-mode, 20 steps"
"$py" -c "from vopd_bench.tiny.vllm_runnable import build_vllm_tiny; build_vllm_tiny('qwen2.5-vl', '$out/qwen25')"
timeout 150 "$py" -m vopd_bench.cli distill "$out/qwen25" --data synthetic:train --out "$out/distill" --steps 20 \
    --rollout-engine vllm --vllm-sleep-mode --importance-weight --vllm-gpu-memory-utilization 0.3 --n-rollouts 4 \
    --max-new-tokens 16 --no-remeasure --quiet 2>&1 | tee "$out/distill.log"
! grep -q Traceback "$out/distill.log"
"$py" - "$out/distill/train_log.jsonl" <<'PY'
import json
import sys

weights = [json.loads(line)["is_weight"] for line in open(sys.argv[1]) if line.strip()]
print("importance weights:", " ".join(f"{w:.3f}" for w in weights))
sys.exit(0 if all(0.98 <= w <= 1.02 for w in weights) else 1)
PY

echo "== 4. rollout tokens/s, vLLM against HF"
timeout 150 "$py" benchmarks/vllm_rollout_speed.py "$out/medium"
