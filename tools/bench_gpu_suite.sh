#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md, on one node; each run writes RESULTS/<name>.json and .log.
#
#   tools/bench_gpu_suite.sh one-gpu RESULTS    # ceilings; GRPO and PPO (hf); GRPO without KL vs TRL; the same on vLLM
#   tools/bench_gpu_suite.sh two-gpu RESULTS    # GRPO on 2 GPUs: colocated, disaggregated sync, disaggregated async
#   tools/bench_gpu_suite.sh train-mfu RESULTS  # GRPO (hf, no KL) at BENCH_SHAPE (set qwen2.5-1.5b): the update padded
#                                               # in micro-batches of 16, then packed into 8k-token micro-batches
#   tools/bench_gpu_suite.sh update RESULTS     # the update alone (tools/bench_update.py): SmolLM2-135M shape with
#                                               # short and long answers (micro-batches of 64 vs a 32k-token budget,
#                                               # ZeRO-0 vs 1), Qwen2.5-1.5B eager vs actor.compile
#
# Environment: BENCH_SHAPE (qwen2.5-0.5b), BENCH_ITERATIONS (4), BENCH_WORK_DIR (/tmp/hpc_rlhf_bench),
# BENCH_BACKENDS ("hf vllm": vllm runs are skipped when vllm is not importable), BENCH_TRL (1: run the TRL peer),
# BENCH_DEVICE (cuda; cpu for a smoke run), BENCH_SIZES (the batch flags, default the documented setting).
set -u -o pipefail
mode=${1:?usage: tools/bench_gpu_suite.sh one-gpu|two-gpu|train-mfu|update RESULTS_DIR}
results=${2:-bench_results}
mkdir -p "$results"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

shape=${BENCH_SHAPE:-qwen2.5-0.5b}
work=${BENCH_WORK_DIR:-/tmp/hpc_rlhf_bench}
device=${BENCH_DEVICE:-cuda}
read -r -a batch <<<"${BENCH_SIZES:---rollout-batch-size 64 --n-samples 8 --prompt-len 128 --gen-len 512 --train-batch-size 128 --micro-batch-size 16}"
sizes=(--shape "$shape" --iterations "${BENCH_ITERATIONS:-4}" --warmup 1 "${batch[@]}" --work-dir "$work"
       --device "$device")
backends=${BENCH_BACKENDS:-hf vllm}
python -c "import vllm" 2>/dev/null || backends=${backends//vllm/}
read -r -a backend_list <<<"$backends"

run() {  # run NAME TOOL ARGS...: one benchmark, its table on stdout, everything in RESULTS/NAME.{json,log}
  local name=$1 tool=$2
  shift 2
  echo "== $name" >&2
  python "$tool" "${sizes[@]}" "$@" --out "$results/$name.json" >"$results/$name.log" 2>&1
  local rc=$?
  grep -E '^\||: iteration|utilisation' "$results/$name.log" || true
  [ $rc -eq 0 ] || { echo "$name failed (exit $rc); last lines of $results/$name.log:"; tail -15 "$results/$name.log"; }
}

measure_ceilings() {  # this device's matmul and copy ceilings into RESULTS/ceilings.json, the limits of every table
  python -c "
import json, dataclasses
from hpc_rlhf.benchmarks.ceilings import measure_ceilings
c = dataclasses.asdict(measure_ceilings('$device')); print(c)
json.dump(c, open('$results/ceilings.json', 'w'), indent=1)"
}

case $mode in
  one-gpu)
    measure_ceilings
    for backend in "${backend_list[@]}"; do
      run "grpo_$backend" tools/bench_e2e.py --algo grpo --backend "$backend" --ceilings "$results/ceilings.json"
      run "ppo_$backend" tools/bench_e2e.py --algo ppo --backend "$backend" --ceilings "$results/ceilings.json"
      run "grpo_nokl_$backend" tools/bench_e2e.py --algo grpo --no-kl --backend "$backend" \
        --ceilings "$results/ceilings.json"
    done
    if [ "${BENCH_TRL:-1}" = 1 ] && python -c "import trl" 2>/dev/null; then
      run trl_hf tools/bench_trl.py
      if [[ " ${backend_list[*]} " == *" vllm "* ]]; then run trl_vllm tools/bench_trl.py --use-vllm --vllm-sleep-mode; fi
    fi
    ;;
  two-gpu)
    backend=${backend_list[-1]}  # vllm when available, else hf
    for layout in "colocated" "disaggregated" "disaggregated --async-queue 1"; do
      name="grpo2_${layout// --async-queue 1/_async}_$backend"
      # shellcheck disable=SC2086  # the layout string carries its own flags
      run "$name" tools/bench_e2e.py --algo grpo --no-kl --backend "$backend" --gpus 2 --layout $layout
    done
    ;;
  train-mfu)
    # 512 sequences of 128 + 128 tokens per iteration, one optimizer step: the training phases' MFU at this shape
    measure_ceilings
    sizes=(--shape "$shape" --iterations "${BENCH_ITERATIONS:-4}" --warmup 1 --rollout-batch-size 64 --n-samples 8
           --prompt-len 128 --gen-len 128 --train-batch-size 512 --work-dir "$work" --device "$device")
    run "mfu_padded_$shape" tools/bench_e2e.py --algo grpo --no-kl --backend hf --micro-batch-size 16 \
      --ceilings "$results/ceilings.json"
    run "mfu_packed_$shape" tools/bench_e2e.py --algo grpo --no-kl --backend hf --micro-batch-size 128 \
      --set train.packing_samples=true --set train.max_tokens_per_microbatch=8192 --ceilings "$results/ceilings.json"
    ;;
  update)
    measure_ceilings
    update=(python tools/bench_update.py --device "$device" --ceilings "$results/ceilings.json" --work-dir "$work")
    "${update[@]}" --micro 64,t32768 --zero 0,1 --steps 6 --warmup 3 --profile --out "$results/update_135m_late.json"
    "${update[@]}" --response-len 120 --micro 64,t32768 --steps 3 --warmup 2 --out "$results/update_135m_early.json"
    "${update[@]}" --shape qwen2.5-1.5b --samples 512 --prompt-len 128 --response-len 128 --fixed-lengths \
      --micro 16 --compile off,on --steps 4 --warmup 2 --out "$results/update_1p5b_fixed.json"
    ;;
  *) echo "unknown mode $mode (one-gpu, two-gpu, train-mfu or update)" >&2; exit 2 ;;
esac
