#!/usr/bin/env python
"""Where vLLM generation spends its time on a small model: the same batch with per-token log-probs as dicts, as flat
lists, and without log-probs; the Python garbage collector's share; and a profile of the adapter's call.

One `VllmEngine` (the adapter the trainer uses) on the model of `--config` (`actor.pretrain`); the prompts are the
first `--batch` training prompts of that config, rendered and encoded as the trainer does, `--n` samples each,
sampled at `--temperature` until eos or `--max-new-tokens`. Every call re-seeds the CUDA generators with the same
seed; whether the modes then drew the same tokens is reported (`same_tokens`: vLLM does not always repeat them, so
compare per call and per token). Per mode: one warm-up call, then the median of `--repeats` timed calls of
`llm.generate` alone; "adapter" times `VllmEngine.generate` (requests built, outputs turned into samples).

    python tools/bench_vllm_generate.py --config configs/smollm2_grpo_1gpu.yaml --batch 32 --n 8 \
        --max-new-tokens 200 --out vllm_gen.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing the package

from hpc_rlhf.builtin_models.resolve import resolve_model_path  # noqa: E402
from hpc_rlhf.config.loading import load_config  # noqa: E402
from hpc_rlhf.config.schema import Config  # noqa: E402
from hpc_rlhf.data.prompts import load_prompts  # noqa: E402
from hpc_rlhf.generation import SamplingParams  # noqa: E402
from hpc_rlhf.generation.vllm_engine import VllmEngine, request_prompts  # noqa: E402
from hpc_rlhf.trainers.ppo.rollout_stage import encode_prompts  # noqa: E402

# the log-prob fields of vllm.SamplingParams per mode (the adapter asks for logprobs=0 with flat_logprobs=True)
MODES = {"dict_logprobs": {"logprobs": 0, "flat_logprobs": False},
         "flat_logprobs": {"logprobs": 0, "flat_logprobs": True},
         "no_logprobs": {"logprobs": None}}


class GcClock:
    """Counts garbage collections and the seconds spent in them while installed (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.collections = 0
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.collections += 1
            self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self)


def render_prompts(cfg: Config, tokenizer: Any, batch: int) -> list[list[int]]:
    """The first `batch` training prompts of `cfg` as the trainer renders and encodes them."""
    prompts = load_prompts(cfg.data.prompt_data, input_key=cfg.data.input_key,
                           apply_chat_template=cfg.data.apply_chat_template,
                           input_template=cfg.data.input_template, max_samples=batch, tokenizer=tokenizer)
    return encode_prompts(cfg, tokenizer, [p.prompt for p in prompts])


def timed_calls(call, repeats: int, seed: int) -> tuple[list[float], Any, GcClock]:
    """One warm-up call, then `repeats` timed ones, each after re-seeding; returns times, last output, gc clock."""
    torch.cuda.manual_seed_all(seed)
    call()
    times, clock = [], GcClock()
    with clock:
        for _ in range(repeats):
            torch.cuda.manual_seed_all(seed)
            torch.cuda.synchronize()
            start = time.perf_counter()
            output = call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times, output, clock


def summary(times: list[float], tokens: list[list[int]], clock: GcClock, repeats: int) -> dict:
    seconds = sorted(times)[len(times) // 2]
    steps = max(len(t) for t in tokens)
    return {"seconds": seconds, "all_seconds": times, "new_tokens": sum(len(t) for t in tokens),
            "decode_steps": steps, "ms_per_step": 1000 * seconds / steps,
            "gc_collections_per_call": clock.collections / repeats, "gc_s_per_call": clock.seconds / repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_grpo_1gpu.yaml", help="model and prompts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile-top", type=int, default=30, help="functions listed from the adapter's profile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    cfg = load_config(args.config).config
    model_path = resolve_model_path(cfg.actor.pretrain)
    prompts = render_prompts(cfg, AutoTokenizer.from_pretrained(model_path), args.batch)
    build_start = time.perf_counter()
    engine = VllmEngine(model_path, gpu_memory_utilization=args.gpu_memory_utilization,
                        max_model_len=max(map(len, prompts)) + args.max_new_tokens, seed=args.seed)
    build_s = time.perf_counter() - build_start
    eos = engine.llm.get_tokenizer().eos_token_id
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, n=args.n,
                            seed=args.seed, stop_token_ids=[eos])
    inputs = request_prompts(engine.vllm, prompts, [[] for _ in prompts], args.n, None)
    result: dict[str, Any] = {"config": args.config, "model": cfg.actor.pretrain, "batch": args.batch, "n": args.n,
                              "max_new_tokens": args.max_new_tokens, "engine_build_s": build_s,
                              "versions": {"vllm": engine.vllm.__version__, "torch": torch.__version__},
                              "device": torch.cuda.get_device_name(), "modes": {}}
    reference = None
    for name, logprob_fields in MODES.items():
        requests = [engine.vllm.SamplingParams(n=1, max_tokens=min(args.max_new_tokens, engine.max_model_len - len(p)),
                                               temperature=args.temperature, top_p=1.0, top_k=0, stop_token_ids=[eos],
                                               detokenize=False, **logprob_fields)
                    for p in prompts for _ in range(args.n)]
        times, outputs, clock = timed_calls(
            lambda: engine.llm.generate(inputs, sampling_params=requests, use_tqdm=False), args.repeats, args.seed)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        reference = tokens if reference is None else reference
        result["modes"][name] = {**summary(times, tokens, clock, args.repeats), "same_tokens": tokens == reference}
        print(f"{name}: {result['modes'][name]['seconds']:.3f} s", file=sys.stderr)

    times, samples, clock = timed_calls(lambda: engine.generate(prompts, params), args.repeats, args.seed)
    tokens = [s.response_ids for row in samples for s in row]
    result["modes"]["adapter"] = summary(times, tokens, clock, args.repeats)
    torch.cuda.manual_seed_all(args.seed)
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile_top)
    result["adapter_profile_by_tottime"] = text.getvalue().splitlines()
    print(json.dumps({k: v for k, v in result.items() if k != "adapter_profile_by_tottime"}, indent=1))
    print("\n".join(result["adapter_profile_by_tottime"]))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
