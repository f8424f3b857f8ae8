"""The trainers that generate: rejection sampling (best-of-N, RAFT) and iterative DPO. Kept responses really are the
best of their group (re-scored here), the written dataset feeds SFT, rounds resume from their files, and training
raises the reward of the policy's own held-out answers (checked here by greedy decoding with plain transformers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hpc_rlhf.tasks.arithmetic import reward_func

# A reward the tiny policy can learn in a few steps: 1 when the answer starts with the digit 1.
FIRST_DIGIT_REWARD = """
import torch


def reward_func(queries, prompts, labels, **_):
    responses = [q[q.find(p) + len(p):] if p in q else "" for q, p in zip(queries, prompts)]
    return torch.tensor([1.0 if r.startswith("1") else 0.0 for r in responses])
"""


@pytest.fixture
def first_digit_reward(tmp_path) -> Path:
    path = tmp_path / "first_digit_reward.py"
    path.write_text(FIRST_DIGIT_REWARD)
    return path


def rule_rewards(prompts: list[str], responses: list[str], labels: list[str]) -> list[float]:
    return reward_func([p + r for p, r in zip(prompts, responses)], prompts, labels)["rewards"].tolist()


@torch.no_grad()
def greedy_answers(path: Path, prompts: list[str], max_new_tokens: int = 6) -> list[str]:
    """The model's greedy answer to each prompt, decoded without special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def share_starting_with_one(path: Path, prompts: list[str]) -> float:
    return sum(a.startswith("1") for a in greedy_answers(path, prompts)) / len(prompts)


def test_rejection_sampling_keeps_the_best_and_resumes_at_the_next_round(make_config, train, series, rows, models):
    from hpc_rlhf.trainers.supervised_data import load_sft_examples

    cfg = make_config("rejection_sampling", rollout__batch_size=48, rejection_sampling__rounds=2,
                      rejection_sampling__train_sft="false", eval__data="")
    first = train(cfg, should_stop=lambda: True)  # asked to stop as soon as round 0 is written
    assert first["stopped"] == 1.0
    run = Path(cfg.train.run_dir)
    round0 = run / "rejection_sampling" / "round_000.jsonl"
    assert round0.is_file() and not (run / "rejection_sampling" / "round_001.jsonl").exists()
    written = round0.stat().st_mtime_ns
    train(cfg)
    assert round0.stat().st_mtime_ns == written  # reused, not sampled again

    kept = rows(run / "rejection_sampling.jsonl")
    assert len(kept) == len(rows(round0)) + len(rows(run / "rejection_sampling" / "round_001.jsonl")) > 10
    assert set(kept[0]) == {"input", "response", "reward", "label"}
    # min_reward 1.0 keeps right answers only; each stored reward is what the rule gives the stored response.
    assert rule_rewards([r["input"] for r in kept], [r["response"] for r in kept], [r["label"] for r in kept]) == \
        [r["reward"] for r in kept] == [1.0] * len(kept)
    best, average = series(run, "rollout/best_reward_mean"), series(run, "rollout/reward_mean")
    assert len(best) == 2 and all(b > a for (_, b), (_, a) in zip(best, average))
    examples, report = load_sft_examples(run / "rejection_sampling.jsonl", cfg, _tokenizer(models["arith"]))
    assert len(examples) == len(kept) and not report.skipped


def test_raft_raises_the_reward_of_held_out_answers(make_config, train, series, rows, models, first_digit_reward):
    cfg = make_config("rejection_sampling", rollout__batch_size=64, rejection_sampling__rounds=2,
                      reward__reward_func_path=str(first_digit_reward), eval__max_samples=64)
    train(cfg)
    run = Path(cfg.train.run_dir)
    rewards = [v for _, v in series(run, "eval/reward_mean")]
    assert len(rewards) == 3 and rewards[-1] > rewards[0] + 0.3, rewards  # before, after round 0, after round 1
    prompts = [r["input"] for r in rows(Path(cfg.eval.data))[64:104]]  # prompts the run never evaluated
    initial, trained = share_starting_with_one(models["arith"], prompts), share_starting_with_one(run / "hf" / "actor",
                                                                                                    prompts)
    assert trained > initial + 0.3, (initial, trained)


def test_iterative_dpo_pairs_best_against_worst_and_raises_the_reward(make_config, train, series, rows, models,
                                                                      first_digit_reward):
    cfg = make_config("iterative_dpo", rollout__batch_size=64, pref__rounds=2,
                      reward__reward_func_path=str(first_digit_reward), eval__max_samples=64)
    train(cfg)
    run = Path(cfg.train.run_dir)
    pairs = rows(run / "iterative_dpo" / "round_000.jsonl") + rows(run / "iterative_dpo" / "round_001.jsonl")
    assert len(pairs) >= 32
    assert all(p["chosen"].startswith("1") and not p["rejected"].startswith("1") for p in pairs)
    assert all((p["chosen_reward"], p["rejected_reward"]) == (1.0, 0.0) for p in pairs)
    tokenizer = _tokenizer(models["arith"])
    assert all(tokenizer.decode(p["chosen_ids"], skip_special_tokens=True) == p["chosen"] for p in pairs)
    losses = series(run, "train/loss")
    assert losses[0][1] == pytest.approx(math.log(2.0), rel=1e-5)  # the policy starts as its reference
    rewards = [v for _, v in series(run, "eval/reward_mean")]
    assert len(rewards) == 3 and rewards[-1] > rewards[0] + 0.3, rewards
    prompts = [r["input"] for r in rows(Path(cfg.eval.data))[64:104]]
    initial, trained = share_starting_with_one(models["arith"], prompts), share_starting_with_one(run / "hf" / "actor",
                                                                                                    prompts)
    assert trained > initial + 0.3, (initial, trained)


def test_lora_iterative_dpo_samples_with_the_merged_adapter(make_config, train, series, first_digit_reward):
    """Only the adapters train, and the engine that samples and evaluates gets them merged: the reward of its own
    answers rises round after round."""
    cfg = make_config("iterative_dpo", rollout__batch_size=64, pref__rounds=2, lora__rank=8, lora__alpha=16,
                      actor__learning_rate=1e-2, reward__reward_func_path=str(first_digit_reward),
                      eval__max_samples=64)
    train(cfg)
    run = Path(cfg.train.run_dir)
    assert (run / "hf" / "actor" / "adapter_config.json").is_file()
    assert series(run, "train/loss")[0][1] == pytest.approx(math.log(2.0), rel=1e-5)  # B = 0: policy = reference
    rewards = [v for _, v in series(run, "eval/reward_mean")]
    assert len(rewards) == 3 and rewards[-1] > rewards[0] + 0.3, rewards


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
