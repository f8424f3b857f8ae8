"""From the config to generation: the engine (vLLM or Hugging Face) with its executor, and the sampling settings.

The PPO family, iterative DPO and rejection sampling all generate, so the choices made here are the same for all of
them: the backend `auto` picks, the dtype, and the per-(iteration, engine) sampling seed that makes a resumed run
redraw exactly what it lost.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from hpc_rlhf.config.checks import kl_needs_reference
from hpc_rlhf.config.schema import Config
from hpc_rlhf.generation import (GenerationEngine, MultiTurnExecutor, SamplingParams, SingleTurnExecutor, make_engine,
                                 make_executor)
from hpc_rlhf.trainers.engines import use_cuda


def vllm_importable() -> bool:
    """Whether vLLM is installed (checked without importing it: the import takes seconds and needs CUDA)."""
    return importlib.util.find_spec("vllm") is not None


def generation_backend(cfg: Config) -> str:
    """`vllm.backend`, with `auto` meaning vLLM on GPUs where it is installed and Hugging Face otherwise."""
    if cfg.vllm.backend != "auto":
        return cfg.vllm.backend
    return "vllm" if use_cuda(cfg) and vllm_importable() else "hf"


def build_generation(cfg: Config, model_path: str, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                     tp_group: Optional[dist.ProcessGroup] = None
                     ) -> tuple[GenerationEngine, SingleTurnExecutor | MultiTurnExecutor]:
    """The generation engine and the executor (single- or multi-turn) that drives it."""
    rollout, vllm = cfg.rollout, cfg.vllm
    max_length = rollout.prompt_max_len + rollout.generate_max_len
    engine = make_engine(generation_backend(cfg), model_path, dtype=vllm.dtype if use_cuda(cfg) else "float32",
                         device=device, tp=cfg.layout.generator.tp,
                         gpu_memory_utilization=vllm.gpu_memory_utilization, enable_sleep=vllm.enable_sleep,
                         enable_prefix_caching=vllm.enable_prefix_caching, enforce_eager=vllm.enforce_eager,
                         max_num_seqs=vllm.max_num_seqs, seed_per_request=vllm.seed_per_request,
                         micro_batch_size=rollout.micro_batch_size,
                         max_model_len=max_length, seed=cfg.train.seed, pad_token_id=tokenizer.pad_token_id,
                         shared_world=cfg.layout.colocate, tp_group=tp_group, child_process=vllm.child_process)
    executor = make_executor(engine, tokenizer, agent_func_path=rollout.agent_func_path, max_turns=rollout.max_turns,
                             max_length=max_length)
    return engine, executor


def sampling_seed(seed: int, iteration: int, engine: int) -> int:
    """Seed of one engine's (or rank's) sampling in one iteration or round: distinct per engine, the same on resume."""
    return (seed * 1_000_003 + iteration * 7_919 + engine * 104_729) % (2**31 - 1)


def behaviour_log_probs_used(cfg: Config) -> bool:
    """Whether training reads the generator's log-probs of the sampled tokens: the KL against a reference (estimated
    from them for the reward and its metric), an off-policy correction, or `rollout.record_behaviour_log_probs`."""
    return (kl_needs_reference(cfg.algo) or cfg.algo.off_policy_correction != "none"
            or cfg.rollout.record_behaviour_log_probs)


def sampling_params(cfg: Config, seed: int, *, n: Optional[int] = None, temperature: Optional[float] = None,
                    eos_token_id: Optional[int] = None, log_probs: Optional[bool] = None) -> SamplingParams:
    """`rollout.*` sampling settings; `n` and `temperature` override them (evaluation draws one answer, greedily);
    `log_probs` whether the engine reports the sampled tokens' log-probs (default: where training reads them)."""
    rollout = cfg.rollout
    return SamplingParams(max_new_tokens=rollout.generate_max_len,
                          temperature=rollout.temperature if temperature is None else temperature,
                          top_p=rollout.top_p, top_k=rollout.top_k,
                          n=rollout.n_samples_per_prompt if n is None else n, seed=seed,
                          stop_token_ids=[] if eos_token_id is None else [eos_token_id],
                          log_probs=behaviour_log_probs_used(cfg) if log_probs is None else log_probs)
