"""The PPO run's prompt set is the mix data.prompt_data_probs asks for, drawn with train.seed."""

from __future__ import annotations

import json
from pathlib import Path

from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.data import interleave_order
from hpc_rlhf.trainers.ppo.components import load_prompt_sets


def write_prompts(path: Path, prefix: str, count: int) -> Path:
    path.write_text("".join(json.dumps({"input": f"{prefix}{i}=", "label": str(i)}) + "\n" for i in range(count)))
    return path


def test_prompt_sets_follow_the_mix(tmp_path):
    a, b = write_prompts(tmp_path / "a.jsonl", "1+", 40), write_prompts(tmp_path / "b.jsonl", "2+", 10)
    tokenizer = build_tiny_tokenizer()
    args = [f"--data.prompt_data={a},{b}", "--data.prompt_data_probs=[0.5, 0.5]", "--eval.data="]
    prompts, eval_prompts = load_prompt_sets(load_config(None, args + ["--train.seed=5"]).config, tokenizer)
    order = interleave_order([40, 10], [0.5, 0.5], 5)
    assert [p.prompt for p in prompts] == [f"{d + 1}+{row}=" for d, row in order] and eval_prompts == []
    assert [p.label for p in prompts] == [str(row) for _, row in order]
    again, _ = load_prompt_sets(load_config(None, args + ["--train.seed=5"]).config, tokenizer)
    assert again == prompts, "the same seed gives the same prompt set (every rank, every resumed run)"
    other, _ = load_prompt_sets(load_config(None, args + ["--train.seed=6"]).config, tokenizer)
    assert [p.prompt for p in other] != [p.prompt for p in prompts]
    # b (10 rows) is used up after about 20 draws of a's 40: the mix has >= 50 rows, half of them b's oversampled
    assert len(prompts) >= 50 and {p.prompt for p in prompts} == {f"1+{i}=" for i in range(40)} | {
        f"2+{i}=" for i in range(10)}
    plain, _ = load_prompt_sets(load_config(None, [f"--data.prompt_data={a},{b}", "--eval.data="]).config, tokenizer)
    assert [p.prompt for p in plain] == [f"1+{i}=" for i in range(40)] + [f"2+{i}=" for i in range(10)]
