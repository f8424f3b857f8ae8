"""Held-out evaluation of a PPO run (eval.data): logged at the right iterations, over the right number of prompts,
equal to an independent greedy pass of the same model, and the same in two runs with the same seed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.data import load_prompts
from hpc_rlhf.tasks.arithmetic import reward_func
from hpc_rlhf.tasks.evaluation import generate_responses

EVAL_DATA = "data/arithmetic/test.jsonl"
EVAL_PROMPTS = 8
EVAL = [f"--eval.data={EVAL_DATA}", f"--eval.max_samples={EVAL_PROMPTS}", "--eval.steps=2",
        "--train.max_iterations=3"]
EVAL_KEYS = ("eval/accuracy", "eval/reward_mean")


def eval_rows(jobs, run_dir) -> list[dict]:
    return [{key: row[key] for key in ("step", *EVAL_KEYS)} for row in jobs.metrics(run_dir) if "eval/accuracy" in row]


def greedy_pass_of_the_initial_model() -> tuple[float, float]:
    """(accuracy, mean reward) of the initial policy on the first EVAL_PROMPTS held-out prompts, computed apart from
    the trainer: transformers' generate, greedy, rollout.generate_max_len = 4 new tokens (FAST), prompts tokenized
    with the tokenizer's special tokens as the trainer does for plain prompts, scored by the task's reward."""
    path = resolve_model_path("builtin:tiny-llama-arith")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", torch_dtype=torch.float32).eval()
    examples = load_prompts(EVAL_DATA, label_key="label", max_samples=EVAL_PROMPTS)
    prompts = [e.prompt for e in examples]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=4, add_special_tokens=True)
    queries = [p + tokenizer.decode(r, skip_special_tokens=False) for p, r in zip(prompts, responses)]
    out = reward_func(queries, prompts, [e.label for e in examples])
    return out["scores"].float().mean().item(), out["rewards"].float().mean().item()


@pytest.mark.timeout(300)
def test_ppo_eval_is_logged_counted_independent_and_reproducible(tmp_path, jobs):
    first, second = tmp_path / "first", tmp_path / "second"
    jobs.run(first, *EVAL)
    jobs.run(second, *EVAL)
    rows = eval_rows(jobs, first)
    # every eval.steps = 2 iterations from iteration 0 (before any update), and once after the last (3 iterations)
    assert [row["step"] for row in rows] == [0, 2, 3]
    for row in rows:
        accuracy, reward = row["eval/accuracy"], row["eval/reward_mean"]
        assert 0.0 <= accuracy <= 1.0 and 0.0 <= reward <= 1.0  # 0/1 scores; rewards 0, 0.1 (well formed) or 1
        # one greedy answer for each of the 8 prompts: the accuracy is a multiple of 1/8 and the rewards add up to
        # (right answers) + 0.1 x (well-formed wrong ones)
        right = accuracy * EVAL_PROMPTS
        assert right == pytest.approx(round(right), abs=1e-6)
        well_formed_wrong = (reward * EVAL_PROMPTS - round(right)) / 0.1
        assert well_formed_wrong == pytest.approx(round(well_formed_wrong), abs=1e-3)
        assert 0 <= round(well_formed_wrong) <= EVAL_PROMPTS - round(right)
    accuracy, reward = greedy_pass_of_the_initial_model()
    assert rows[0]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert rows[0]["eval/reward_mean"] == pytest.approx(reward, abs=1e-6)
    assert eval_rows(jobs, second) == rows, "greedy evaluation with the same seed gives the same numbers"
