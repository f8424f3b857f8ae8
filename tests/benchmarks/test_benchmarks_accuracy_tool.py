"""tools/bench_accuracy.py on the CPU with the tiny chat model: both systems run the same config, stop at the
training budget, evaluate on the same held-out prompts and report a curve; the report compares them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--actor.pretrain=builtin:tiny-llama", "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2",
         "--rollout.generate_max_len=6", "--rollout.micro_batch_size=4", "--train.train_batch_size=4",
         "--train.micro_train_batch_size=2", "--eval.max_samples=4", "--eval.steps=1", "--train.device=cpu",
         "--ds.bf16=false", "--train.skip_old_logprobs=true", "--logger.progress_bar=false",
         "--actor.attn_implementation=eager"]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_both_systems_run_to_the_budget_and_report(tmp_path):
    out = tmp_path / "bench"
    for system in ("hpc", "trl"):
        run_tool(system, "--config", "configs/smollm2_grpo_1gpu.yaml", "--budget-s", "3", "--out", str(out), *SMALL)
    hpc = json.loads((out / "hpc_rlhf.json").read_text())
    trl = json.loads((out / "trl.json").read_text())
    for result in (hpc, trl):
        curve = result["curve"]
        # evaluated before training and after every iteration until the budget stopped the run
        assert curve[0]["iteration"] == 0 and curve[0]["train_s"] == 0.0
        assert len(curve) >= 2 and all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
        assert [p["iteration"] for p in curve] == sorted(p["iteration"] for p in curve)
        assert result["iteration_s"] and all(s > 0 for s in result["iteration_s"])
        assert result["curve"][-1]["train_s"] >= 3.0 or len(result["iteration_s"]) >= 1
        assert result["generation"] == "hf"  # on the CPU both generate with Hugging Face models
    report = run_tool("report", str(out)).stdout
    assert "| hpc_rlhf |" in report and "| trl |" in report
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_arguments_are_checked_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "hpc", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs --config and --out" in result.stderr


def test_trl_takes_the_configs_vllm_settings_in_colocate_mode(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import bench_accuracy
    from hpc_rlhf.config.loading import load_config

    cfg = load_config(str(REPO / "configs" / "smollm2_grpo_1gpu.yaml"),
                      ["--vllm.gpu_memory_utilization=0.3", "--vllm.enable_sleep=true"]).config
    plain = bench_accuracy.trl_grpo_config(cfg, tmp_path, cuda=False)
    assert plain.use_vllm is False
    config = bench_accuracy.trl_grpo_config(cfg, tmp_path, cuda=False, use_vllm=True)
    assert config.use_vllm is True and config.vllm_mode == "colocate"
    assert config.vllm_gpu_memory_utilization == 0.3 and config.vllm_enable_sleep_mode is True
    assert config.vllm_max_model_length == 128 + 200  # the config's prompt_max_len + generate_max_len
