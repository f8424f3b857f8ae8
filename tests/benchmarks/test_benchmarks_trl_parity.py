"""tools/trl_parity.py on the CPU with the tiny chat model: hpc_rlhf and TRL's GRPOTrainer render the same prompt
ids, sample the model's distribution, compute the same advantages and, in fp32, the same loss and gradient of one
optimizer step, for both loss aggregations TRL shares with hpc_rlhf (token mean = TRL's dapo, sequence mean = grpo).
The reward (tests/benchmarks/length_reward.py) varies within each group, so the advantages are real, not zeros."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
# 4 prompts x 4 samples, one optimizer step of 16 in 4 micro-batches of different token counts
SMALL = ["--actor.pretrain=builtin:tiny-llama", "--reward.reward_func_path=tests/benchmarks/length_reward.py", "--rollout.batch_size=4", "--rollout.n_samples_per_prompt=4",
         "--train.train_batch_size=16", "--train.micro_train_batch_size=4", "--rollout.generate_max_len=12",
         "--actor.attn_implementation=eager"]


def run_parity(tmp_path: Path, *overrides: str) -> dict[str, dict]:
    out = tmp_path / "parity.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "trl_parity.py"), "--config",
                             "configs/smollm2_grpo_1gpu.yaml", "--out", str(out), "--draws", "2000", *SMALL,
                             *overrides], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("parity ")] == [
        f"parity {name}" for name in checks]
    return checks


@pytest.mark.timeout(900)
@pytest.mark.parametrize("loss_agg_mode", ["token_mean", "seq_mean_token_mean"])
def test_one_batch_gives_trl_and_hpc_rlhf_the_same_step(tmp_path, loss_agg_mode):
    checks = run_parity(tmp_path, f"--algo.loss_agg_mode={loss_agg_mode}")
    prompts = checks["prompt_ids"]
    assert prompts["identical"] == prompts["prompts"] == 4 and prompts["bos_first"]
    assert prompts["text_first"].count("<s>") == 1  # the chat template's BOS, not a second one from the tokenizer

    sampling = checks["first_token_sampling"]
    assert sampling["generation_config"]["top_k"] == 0 and sampling["generation_config"]["top_p"] == 1.0
    tv = sampling["total_variation"]
    # 2000 draws over the tiny model's ~uniform next token: the exact distribution's own draws sit near 0.17
    assert 0.1 < tv["exact_multinomial"] < 0.25
    assert abs(tv["trl_generate"] - tv["exact_multinomial"]) < 0.03
    assert abs(tv["hpc_hf_engine"] - tv["exact_multinomial"]) < 0.03
    assert 0.0 < sampling["bf16_weights_vs_fp32_exact_tv"] < 0.05  # bf16 weights move the distribution, slightly

    advantages = checks["advantages"]
    assert advantages["rewards_vary_within_a_group"] and advantages["max_abs_difference_same_eps"] < 1e-6
    # hpc_rlhf's own eps (1e-6 against TRL's 1e-4) changes (r - mean) / (std + eps) by less than 1e-3 here
    assert 1e-7 < advantages["max_abs_difference_configured_eps"] < 1e-3

    update = checks["update_gradient"]
    assert update["advantages"] == "the batch's (TRL's)"
    assert update["micro_batches"] == 4 and update["trl_grad_norm"] > 0.1
    assert update["hpc_loss"] == pytest.approx(update["trl_loss"], abs=1e-6)
    assert update["hpc_grad_norm"] == pytest.approx(update["trl_grad_norm"], rel=1e-5)
    assert update["relative_difference"] < 1e-5 and update["cosine"] > 1 - 1e-9

    for precision in ("trl_bf16_autocast", "hpc_bf16"):
        assert 0.99 < checks["bf16_gradient"]["vs_fp32"][precision]["cosine"] < 1.0  # bf16 moves it, a little
    assert all(c["pass"] for c in checks.values())


def test_bad_arguments_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "trl_parity.py"), "--config", "x.yaml", "--out",
                             str(tmp_path / "p.json"), "--draws", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--draws must be >= 1, got 0" in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "tools" / "trl_parity.py"), "--config", "missing.yaml",
                             "--out", str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "trl_parity: config file missing.yaml does not exist"
