"""One GRPO batch through TRL's GRPOTrainer and through hpc_rlhf's update, compared piece by piece (CPU, fp32).

    python tools/trl_parity.py --config configs/smollm2_grpo_1gpu.yaml --out parity.json [--section.key=value ...]

Set up alike (tools/bench_accuracy.py maps one hpc_rlhf config onto TRL's GRPOConfig), the two systems should take
the same step from the same batch. This checks the places where they could still differ, on one real batch of the
config's task and model, without a GPU:

- prompts: the token ids TRL renders for each conversation against the ids hpc_rlhf's rollout encodes (chat
  template, the template's default system prompt, no second BOS);
- sampling: the first response token drawn N times by TRL's generation settings (`generate`) and by hpc_rlhf's hf
  engine, each against the model's exact next-token probabilities (total variation distance; beside it, the
  distance that N draws from the exact distribution itself give), and how far the model's bf16 weights (what
  hpc_rlhf samples from on GPUs) move that distribution from its fp32 weights (what TRL's `generate` samples from);
- advantages: TRL's scale_rewards="group" on the batch's rewards against hpc_rlhf's group_norm (same eps, and the
  configured one);
- the update: TRL's `training_step` over its gradient-accumulation micro-batches against hpc_rlhf's
  `Actor.backward` (DeepSpeed ZeRO-0) with the recipe's loss, on the same samples and advantages: loss, gradient norm
  (what clipping sees), relative difference and cosine of the whole gradient.

Prints one line per check and writes them all to --out as JSON. Needs trl==1.16.0 and datasets (the test extras).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_accuracy import trl_grpo_config, trl_reward, trl_rows, versions  # noqa: E402

TRL_GROUP_STD_EPS = 1e-4  # TRL 1.16's scale_rewards="group": (r - mean) / (std + 1e-4)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="hpc_rlhf YAML config (a GRPO one)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--draws", type=int, default=512, help="first-token draws per sampler (default 512)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        p.error(f"unexpected arguments {bad}; config overrides look like --section.key=value")
    if args.draws < 1:
        p.error(f"--draws must be >= 1, got {args.draws}")
    return args, overrides


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Total variation distance between the distribution `counts` is proportional to (draws, or probabilities) and
    `probs`."""
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def gradient_comparison(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norms, relative L2 difference and cosine of two gradients given parameter by parameter (same names)."""
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"the two models' parameters differ: {sorted(set(ours) ^ set(theirs))[:5]}")
    a = torch.cat([ours[k].flatten().double() for k in sorted(ours)])
    b = torch.cat([theirs[k].flatten().double() for k in sorted(ours)])
    return {"hpc_grad_norm": float(a.norm()), "trl_grad_norm": float(b.norm()),
            "relative_difference": float((a - b).norm() / b.norm().clamp(min=1e-30)),
            "cosine": float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30)),
            "max_abs_difference": float((a - b).abs().max())}


def check_prompts(cfg: Any, tokenizer: Any, trainer: Any, rows: list[dict]) -> tuple[dict, list[list[int]]]:
    """TRL's prompt token ids against the ids hpc_rlhf's rollout encodes from the same rows."""
    from hpc_rlhf.data.prompts import load_prompts
    from hpc_rlhf.trainers.ppo.rollout_stage import encode_prompts

    trl_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in rows])
    examples = load_prompts(cfg.data.prompt_data, input_key=cfg.data.input_key, label_key=cfg.data.label_key,
                            apply_chat_template=True, tokenizer=tokenizer, max_samples=len(rows))
    ours = encode_prompts(cfg, tokenizer, [e.prompt for e in examples])
    trl_ids = [list(map(int, ids)) for ids in trl_ids]
    same = [a == b for a, b in zip(ours, trl_ids)]
    return {"check": "prompt_ids", "prompts": len(rows), "identical": sum(same), "tokens_first": len(ours[0]),
            "bos_first": ours[0][0] == tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None,
            "text_first": tokenizer.decode(ours[0]), "pass": all(same) and len(same) == len(rows)}, ours


def check_sampling(cfg: Any, model_path: str, trainer: Any, prompt_ids: list[int], draws: int) -> dict:
    """First-token draws of TRL's `generate` settings and of hpc_rlhf's hf engine against the exact distribution."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.generation import SamplingParams
    from hpc_rlhf.generation.hf_engine import HFEngine

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    probs = torch.softmax(logits / cfg.rollout.temperature, dim=-1)
    vocab = probs.numel()
    # hpc_rlhf samples from its bf16 weights on GPUs, TRL's `generate` from the fp32 weights it trains
    low = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        bf16_probs = torch.softmax(low(input_ids=ids).logits[0, -1].double() / cfg.rollout.temperature, dim=-1)
    del low
    config = copy.deepcopy(trainer.generation_config)  # TRL's own settings, one new token
    config.max_new_tokens = 1
    torch.manual_seed(cfg.train.seed + 1)  # three independent streams
    with torch.no_grad():
        theirs = model.generate(input_ids=ids.expand(draws, -1), attention_mask=torch.ones(draws, ids.shape[1]),
                                generation_config=config)[:, -1]
    engine = HFEngine(model, pad_token_id=trainer.processing_class.pad_token_id, max_batch_size=draws,
                      seed=cfg.train.seed + 2)
    params = SamplingParams(max_new_tokens=1, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, n=draws, seed=cfg.train.seed + 2)
    ours = torch.tensor([s.response_ids[0] for s in engine.generate([prompt_ids], params)[0]])
    exact_draws = torch.multinomial(probs.float(), draws, replacement=True,
                                    generator=torch.Generator().manual_seed(cfg.train.seed))
    tv = {name: total_variation(torch.bincount(tokens, minlength=vocab).double(), probs)
          for name, tokens in (("trl_generate", theirs), ("hpc_hf_engine", ours), ("exact_multinomial", exact_draws))}
    top = torch.topk(probs, 3)
    return {"check": "first_token_sampling", "draws": draws, "total_variation": tv,
            "bf16_weights_vs_fp32_exact_tv": total_variation(bf16_probs, probs),
            "top3_exact": {str(int(t)): round(float(p), 4) for p, t in zip(top.values, top.indices)},
            "generation_config": {k: getattr(config, k) for k in ("do_sample", "temperature", "top_p", "top_k",
                                                                  "min_p", "repetition_penalty")},
            # each sampler's distance within 1.5x (+0.02) of what the exact distribution's own N draws give
            "pass": max(tv["trl_generate"], tv["hpc_hf_engine"]) <= 1.5 * tv["exact_multinomial"] + 0.02}


def trl_gradient(trainer: Any, batch: dict, accumulation: int, *,
                 autocast_bf16: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """TRL's gradient of one optimizer step: what `training_step` does on each gradient-accumulation slice.

    `training_step` itself would generate a new batch (`_prepare_inputs`), so its two steps are taken here:
    `compute_loss` on the slice and the accelerator's backward, with no further division by the accumulation
    count because GRPOTrainer's loss is already scaled for it (`loss_is_scaled_for_ga`). `autocast_bf16`: fp32
    weights under bf16 autocast, TRL's precision on GPUs (`bf16=True` with the fp32 weights it loads by default).
    """
    from trl.trainer.utils import split_tensor_dict

    if trainer.loss_is_scaled_for_ga is not True:
        raise SystemExit("this TRL's GRPOTrainer no longer scales its loss for gradient accumulation itself: "
                         "trl_gradient must divide by the accumulation count as Trainer.training_step does")
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation
    total = 0.0
    for part in split_tensor_dict(batch, accumulation):
        with trainer.compute_loss_context_manager(), torch.autocast("cpu", torch.bfloat16, enabled=autocast_bf16):
            loss = trainer.compute_loss(model, part)
        trainer.accelerator.backward(loss)
        total += float(loss.detach())
    return total, {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def hpc_gradient(cfg: Any, model_path: str, batch: dict, pad_token_id: int, *,
                 bf16: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """hpc_rlhf's gradient of the same step: the recipe's actor loss through `Actor.backward` (one gloo rank).
    `bf16`: bf16 weights and gradients as on GPUs (DeepSpeed keeps the fp32 master copy in its optimizer)."""
    import torch.distributed as dist
    from hpc_rlhf.distributed.world import free_port
    from hpc_rlhf.trainers.common import actor_engine_config
    from hpc_rlhf.trainers.ppo.update import actor_loss_fn, loss_weighting
    from hpc_rlhf.training.batching import TokenSample, make_micro_batches
    from hpc_rlhf.training.models import Actor

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    samples = []
    for row in range(batch["prompt_ids"].shape[0]):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        response = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        advantage = torch.full((response.numel(),), float(batch["advantages"][row]))
        samples.append(TokenSample(prompt_ids=prompt, response_ids=response, response_tensors={
            "advantages": advantage, "behaviour_log_probs": torch.zeros_like(advantage)}))
    # ZeRO-0 whatever the config says: it leaves the step's gradient in each parameter's .grad, where it is read below
    engine_cfg = dataclasses.replace(actor_engine_config(cfg), bf16=bf16, zero_stage=0)
    actor = Actor.from_pretrained(model_path, engine_cfg, None, 1, temperature=max(cfg.rollout.temperature, 1e-6))
    # TRL's micro-batches (micro_train_batch_size samples each), also where the config sets a token budget
    batches = make_micro_batches(samples, micro_batch_size=cfg.train.micro_train_batch_size, pad_token_id=pad_token_id)
    metrics = actor.backward(batches, actor_loss_fn(cfg),
                             loss_weighting(cfg.algo.loss_agg_mode))
    grads = {name: p.grad.detach().float().clone() for name, p in actor.engine.module.named_parameters()
             if p.grad is not None}
    return metrics, grads


def run(args: argparse.Namespace, overrides: list[str]) -> Iterator[dict]:
    """The checks, each yielded as soon as it is done."""
    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from hpc_rlhf.algos.advantages import group_normalized_rewards
    from hpc_rlhf.builtin_models.resolve import resolve_model_path
    from hpc_rlhf.config.loading import load_config
    from hpc_rlhf.rewards.reward_func import load_reward_func

    cfg = load_config(args.config, [*overrides, "--train.device=cpu", "--ds.bf16=false"]).config
    rollout, n = cfg.rollout, cfg.rollout.n_samples_per_prompt
    model_path = str(resolve_model_path(cfg.actor.pretrain))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = trl_rows(cfg)[: rollout.batch_size]
    reward = trl_reward(tokenizer, load_reward_func(cfg.reward.reward_func_path))
    scratch = tempfile.TemporaryDirectory(prefix="trl_parity-")  # TRL's output_dir: it writes nothing there here
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=trl_grpo_config(cfg, Path(scratch.name),
                                                                                     cuda=False),
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    prompts, our_prompt_ids = check_prompts(cfg, tokenizer, trainer, rows)
    yield prompts
    yield check_sampling(cfg, model_path, trainer, our_prompt_ids[0], args.draws)

    torch.manual_seed(cfg.train.seed)
    trainer.model.train()
    groups = [row for row in rows for _ in range(n)]  # each prompt n times in a row, as TRL's sampler gives them
    batch = trainer._generate_and_score_completions(groups)
    completions = tokenizer.batch_decode(batch["completion_ids"] * batch["completion_mask"],
                                         skip_special_tokens=True)
    rewards = torch.tensor(reward([row["prompt"] for row in groups],
                                  [[{"role": "assistant", "content": c}] for c in completions],
                                  [row["label"] for row in groups]))
    same_eps = group_normalized_rewards(rewards, n, TRL_GROUP_STD_EPS)
    configured = group_normalized_rewards(rewards, n, cfg.algo.group_std_eps)
    varied = bool((rewards.view(-1, n).std(dim=-1) > 0).any())
    yield {"check": "advantages", "samples": int(rewards.numel()), "reward_mean": float(rewards.mean()),
           "rewards_vary_within_a_group": varied,
           "response_tokens": int(batch["completion_mask"].sum()),
           "max_abs_difference_same_eps": float((same_eps - batch["advantages"]).abs().max()),
           "max_abs_difference_configured_eps": float((configured - batch["advantages"]).abs().max()),
           "configured_eps": cfg.algo.group_std_eps,
           "pass": bool(torch.allclose(same_eps, batch["advantages"].float(), atol=1e-5))}

    source = "the batch's (TRL's)"
    if not batch["advantages"].abs().sum():  # no reward varied within a group: nothing would train
        batch["advantages"] = torch.randn(rewards.numel(), generator=torch.Generator().manual_seed(cfg.train.seed))
        source = "seeded standard normal (the batch's rewards were equal within every group)"
    accumulation = cfg.train.train_batch_size // cfg.train.micro_train_batch_size
    trl_loss, theirs = trl_gradient(trainer, batch, accumulation)
    metrics, ours = hpc_gradient(cfg, model_path, batch, tokenizer.pad_token_id)
    comparison = gradient_comparison(ours, theirs)
    yield {"check": "update_gradient", "advantages": source, "micro_batches": accumulation, "trl_loss": trl_loss,
           "hpc_loss": metrics["loss"], **comparison,
           "pass": comparison["trl_grad_norm"] > 0 and comparison["relative_difference"] < 1e-3
           and abs(trl_loss - metrics["loss"]) < 1e-4}

    # Each system's GPU precision against the fp32 gradient above: how far bf16 turns the step's direction.
    _, trl_bf16 = trl_gradient(trainer, batch, accumulation, autocast_bf16=True)
    _, hpc_bf16 = hpc_gradient(cfg, model_path, batch, tokenizer.pad_token_id, bf16=True)
    to_fp32 = {"trl_bf16_autocast": gradient_comparison(trl_bf16, theirs),
               "hpc_bf16": gradient_comparison(hpc_bf16, ours)}
    yield {"check": "bf16_gradient",
           "vs_fp32": {name: {"cosine": c["cosine"], "relative_difference": c["relative_difference"]}
                       for name, c in to_fp32.items()},
           "pass": all(c["cosine"] > 0.99 for c in to_fp32.values())}


def main(argv: list[str] | None = None) -> int:
    from hpc_rlhf.config.schema import ConfigError
    from hpc_rlhf.errors import UsageError, debug_enabled

    args, overrides = parse_args(argv)
    started = time.time()
    results = []
    try:
        for result in run(args, overrides):
            results.append(result)
            print(f"parity {result['check']}: {'PASS' if result['pass'] else 'DIFFERS'} "
                  + json.dumps({k: v for k, v in result.items() if k not in ("check", "pass")}), flush=True)
    except (ConfigError, UsageError, FileNotFoundError) as error:
        if debug_enabled():
            raise
        print(f"trl_parity: {error}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": overrides, "checks": results,
                                          "seconds": round(time.time() - started, 1), "versions": versions()},
                                         indent=1, default=str) + "\n")
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
