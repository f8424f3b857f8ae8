"""A short PPO run with ckpt.best_metric_key and actor.enable_ema: RUN_DIR/hf/best and best.json follow the logged
evaluations, and RUN_DIR/hf/actor_ema is written beside the trained actor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

EVAL = ["--eval.data=data/arithmetic/test.jsonl", "--eval.max_samples=8", "--eval.steps=1",
        "--train.max_iterations=3"]


@pytest.mark.timeout(400)
def test_ppo_keeps_the_best_evaluated_model_and_the_ema(tmp_path, jobs):
    run = tmp_path / "run"
    jobs.run(run, *EVAL, "--ckpt.best_metric_key=eval/reward_mean", "--actor.enable_ema=true",
             "--actor.ema_beta=0.5", "--ckpt.save_hf_model=true")
    rows = [(row["step"], row["eval/reward_mean"]) for row in jobs.metrics(run) if "eval/reward_mean" in row]
    assert [step for step, _ in rows] == [0, 1, 2, 3]  # before each of the 3 iterations and after the last
    best_value = max(value for _, value in rows)
    best_step = next(step for step, value in rows if value == best_value)  # the first time it was reached
    record = json.loads((run / "best.json").read_text())
    assert record == {"metric": "eval/reward_mean", "mode": "max", "step": best_step, "value": best_value}
    hf = run / "hf"
    assert (hf / "best" / "config.json").is_file() and (hf / "best" / "tokenizer_config.json").is_file()
    assert not (hf / "best.candidate").exists()
    best, actor, ema = (load_file(hf / name / "model.safetensors") for name in ("best", "actor", "actor_ema"))
    if best_step == 3:
        assert all(torch.equal(best[k], actor[k]) for k in actor)
    # The EMA with beta 0.5 over 3 updates lies between the initial and the trained weights, equal to neither.
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ema[name], actor[name])
    assert (hf / "actor_ema" / "tokenizer_config.json").is_file()
