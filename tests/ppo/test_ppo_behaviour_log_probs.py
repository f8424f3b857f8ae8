"""The generator's log-probs of the sampled tokens are asked for only where training reads them (KL to a reference,
an off-policy correction, or on request); a run without them trains exactly like one with them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.rollouts import RolloutReader, to_rollout_table
from hpc_rlhf.trainers.generation_setup import behaviour_log_probs_used, sampling_params
from hpc_rlhf.trainers.ppo import experience as exp
from tests.ppo.conftest import REPO, read_metrics, run_train
from tests.ppo.test_ppo_experience import rows


@pytest.mark.parametrize("overrides, used", [
    ([], False),
    (["--algo.init_kl_coef=0.01", "--layout.reference.gpus=1"], True),
    (["--algo.use_kl_loss=true", "--layout.reference.gpus=1"], True),
    (["--algo.off_policy_correction=tis"], True),
    (["--rollout.record_behaviour_log_probs=true"], True),
])
def test_log_probs_are_asked_for_where_training_reads_them(overrides, used):
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["--algo.init_kl_coef=0", *overrides]).config
    assert behaviour_log_probs_used(cfg) is used
    assert sampling_params(cfg, seed=1).log_probs is used
    assert sampling_params(cfg, seed=1, n=1, temperature=0.0, log_probs=False).log_probs is False  # evaluation


def test_a_rollout_without_log_probs_reads_as_none_and_refuses_a_kl_estimate():
    table = to_rollout_table([{**row, "behaviour_log_probs": None} for row in rows([1.0, 0.0], [1.0, 0.0], [2, 3], 2)])
    tensors = exp.table_to_tensors(table)
    assert tensors.behaviour_log_probs is None and tensors.action_mask.sum().item() == 5
    picked = tensors.select(tensors.rewards > 0.5)
    assert picked.behaviour_log_probs is None and picked.num_samples == 1
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["--algo.init_kl_coef=0.01", "--layout.reference.gpus=1",
                                                        "--rollout.n_samples_per_prompt=2"]).config
    with_reference = dataclasses.replace(tensors, reference_log_probs=torch.zeros_like(tensors.action_mask,
                                                                                       dtype=torch.float32))
    with pytest.raises(ValueError, match="no behaviour log-probs to estimate the KL from"):
        exp.advantages_and_returns(cfg, with_reference, with_reference.rewards, 0.01, None)


@pytest.mark.slow
def test_a_run_without_log_probs_trains_exactly_like_one_with_them(tmp_path):
    """GRPO without KL: the shards of the default run hold no log-probs, and every metric but the phase times is
    bit-identical to a run that asks for them (nothing in training reads them)."""
    runs = {}
    for record in ("false", "true"):
        run_dir = tmp_path / record
        run_train(run_dir, "--train.max_iterations=2", f"--rollout.record_behaviour_log_probs={record}")
        runs[record] = run_dir
    without = RolloutReader(runs["false"]).read(1).to_pylist()
    with_them = RolloutReader(runs["true"]).read(1).to_pylist()
    assert [r["response_ids"] for r in without] == [r["response_ids"] for r in with_them]
    assert all(r["behaviour_log_probs"] is None for r in without)
    assert all(len(r["behaviour_log_probs"]) == len(r["response_ids"]) for r in with_them)

    def learned(run_dir):
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "perf/", "system/"))}
                for row in read_metrics(run_dir)]

    first, second = learned(runs["false"]), learned(runs["true"])
    assert len(first) == 2 and first == second
