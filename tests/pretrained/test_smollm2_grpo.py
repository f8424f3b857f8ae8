"""Two GRPO iterations of the real SmolLM2-135M-Instruct on the CPU (hf backend), end to end through
`python -m hpc_rlhf.train`: chat-template prompts, responses that stop at <|im_end|> with varying lengths, and
rewards computed from the parsed answers (hpc_rlhf.tasks.chat_arithmetic)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.builtin_models.pretrained import OFFLINE_ENV, SMOLLM2_NAME
from hpc_rlhf.rollouts.reader import RolloutReader
from hpc_rlhf.tasks import chat_arithmetic
from hpc_rlhf.builtin_models.cache import CACHE_ENV

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 24
EOS = 2  # <|im_end|>


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_grpo_iterations_of_the_real_model(smollm2, tmp_path):
    from transformers import AutoTokenizer

    data = tmp_path / "prompts.jsonl"
    rows = chat_arithmetic.generate_examples("sum2", 4, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml",
        f"--actor.pretrain=builtin:{SMOLLM2_NAME}", "--vllm.backend=hf", "--train.device=cpu",
        f"--data.prompt_data={data}", "--data.apply_chat_template=true", "--eval.data=",
        "--reward.reward_func_path=hpc_rlhf.tasks.chat_arithmetic",
        "--algo.advantage_estimator=group_norm", "--algo.init_kl_coef=0",
        "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=4", f"--rollout.generate_max_len={MAX_NEW}",
        "--rollout.prompt_max_len=128", "--rollout.micro_batch_size=8",
        "--train.train_batch_size=8", "--train.micro_train_batch_size=8", "--train.max_iterations=2",
        "--ds.zero_stage=0", "--actor.learning_rate=1e-6", "--actor.attn_implementation=eager",
        "--train.skip_old_logprobs=true",  # one optimizer step per iteration, as configs/smollm2_grpo_1gpu.yaml
        f"--train.run_dir={run_dir}", "--logger.use_tensorboard=false", "--logger.plot=false",
        "--logger.progress_bar=false", "--ckpt.save_hf_model=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", **{CACHE_ENV: str(smollm2.cache),
                                                                       OFFLINE_ENV: "1"})
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=850, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    reader = RolloutReader(run_dir)
    lengths, ended = [], 0
    for iteration in range(2):
        table = reader.read(iteration, require_filled=["reward", "score"]).to_pylist()
        assert len(table) == 8
        for row in table:
            prompt = tokenizer.decode(row["prompt_ids"])
            assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
            assert chat_arithmetic.INSTRUCTION in prompt
            response = row["response_ids"]
            assert 0 < len(response) <= MAX_NEW
            # A response stops at its first <|im_end|> (which it keeps) or at the length limit.
            assert EOS not in response[:-1]
            assert response[-1] == EOS or len(response) == MAX_NEW
            ended += response[-1] == EOS
            lengths.append(len(response))
            query = tokenizer.decode(row["prompt_ids"] + response)
            expected = chat_arithmetic.reward_func([query], [prompt], [row["label"]])
            assert row["score"] == expected["scores"].item() and row["reward"] == expected["rewards"].item()
    assert ended >= 3, f"only {ended} of 16 responses ended with <|im_end|>; lengths {lengths}"
    assert len(set(lengths)) >= 3, f"response lengths do not vary: {lengths}"

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["train/policy_loss"] for m in metrics if "train/policy_loss" in m]
    assert len(losses) == 2 and all(v is not None and math.isfinite(v) for v in losses)
