"""Config keys of OpenRLHF's training-loop options (dataset mixing, the stop-properly penalty, advantage std
normalisation, DAPO dynamic sampling): how they load, what the checks refuse, and how the OpenRLHF flags translate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_rlhf.config.preflight import check_data_files
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.openrlhf import migrate
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.data import interleave_order


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"input": f"{i}+0=", "label": str(i)}) + "\n" for i in range(count)))
    return path


def test_several_prompt_files_from_yaml_and_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  prompt_data: [a.jsonl, b.jsonl]\n  prompt_data_probs: [0.7, 0.3]\n")
    data = load_config(config).config.data
    assert data.prompt_data == ["a.jsonl", "b.jsonl"] and data.prompt_data_probs == [0.7, 0.3]
    data = load_config(None, ["--data.prompt_data=a.jsonl,b.jsonl", "--data.prompt_data_probs=[0.7, 0.3]"]).config.data
    assert data.prompt_data == "a.jsonl,b.jsonl" and data.prompt_data_probs == [0.7, 0.3]
    defaults = load_config(None, []).config
    assert defaults.data.prompt_data_probs is None and defaults.data.dataset_probs is None


@pytest.mark.parametrize("overrides, message", [
    (["--data.prompt_data=a.jsonl,b.jsonl", "--data.prompt_data_probs=[1.0]"], "1 probabilities for 2 dataset"),
    (["--data.prompt_data=a.jsonl,b.jsonl", "--data.prompt_data_probs=[0.7, 0.2]"], r"must sum to 1.*sum 0.9"),
    (["--data.prompt_data=a.jsonl,b.jsonl", "--data.prompt_data_probs=[1.0, 0.0]"], "must be > 0"),
    (["--data.prompt_data=a.jsonl,,b.jsonl"], "expected one dataset path or several"),
    (["--train.trainer=rejection_sampling", "--data.prompt_data_probs=[1.0]"],
     "rejection_sampling reads the datasets of data.prompt_data one after another"),
    (["--train.trainer=prm", "--data.dataset_probs=[1.0]"], "prm reads the datasets of data.dataset"),
    (["--train.trainer=sft", "--data.dataset=a.jsonl,b.jsonl", "--data.dataset_probs=[0.5]"],
     r"data.dataset_probs \(command line\): 1 probabilities for 2"),
])
def test_impossible_mixes_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_valid_mixes_load():
    load_config(None, ["--data.prompt_data=a.jsonl,b.jsonl", "--data.prompt_data_probs=[0.25, 0.75]"])
    load_config(None, ["--train.trainer=sft", "--data.dataset=[a.jsonl, b.jsonl]", "--data.dataset_probs=[0.5, 0.5]"])


def test_file_check_counts_the_prompts_of_the_mix(tmp_path):
    """Two files of 3 and 2 prompts: 5 one after another; mixed 0.9 / 0.1, the mix runs until the second file's 2
    prompts are drawn, which takes len(interleave_order([3, 2], [0.9, 0.1], seed)) rows."""
    a, b = write_prompts(tmp_path / "a.jsonl", 3), write_prompts(tmp_path / "b.jsonl", 2)
    base = [f"--data.prompt_data={a},{b}", "--eval.data=", "--rollout.batch_size=8", "--train.train_batch_size=32"]
    loaded = load_config(None, base)
    errors = check_data_files(loaded.config, loaded.sources)
    assert len(errors) == 1 and "has 5 usable prompts, fewer than rollout.batch_size=8" in errors[0]
    mixed_size = len(interleave_order([3, 2], [0.9, 0.1], 42))
    assert mixed_size >= 8  # E = 2 / 0.1 = 20 rows
    loaded = load_config(None, base + ["--data.prompt_data_probs=[0.9, 0.1]"])
    assert check_data_files(loaded.config, loaded.sources) == []
    loaded = load_config(None, base + ["--data.prompt_data_probs=[0.9, 0.1]", "--data.max_samples=6"])
    assert "has 6 usable prompts" in check_data_files(loaded.config, loaded.sources)[0]
    loaded = load_config(None, [f"--data.prompt_data={a},{tmp_path / 'missing.jsonl'}", "--eval.data="])
    assert "missing.jsonl does not exist" in check_data_files(loaded.config, loaded.sources)[0]


def test_openrlhf_mixing_flags_translate():
    for argv in (["--pretrain", "m", "--prompt_data", "a.jsonl,b.jsonl", "--prompt_data_probs", "0.7,0.3"],
                 ["--actor.model_name_or_path", "m", "--data.prompt_dataset", "a.jsonl,b.jsonl",
                  "--data.prompt_probs", "0.7,0.3"]):
        config, notes = migrate(argv)
        assert config["data"]["prompt_data"] == "a.jsonl,b.jsonl" and config["data"]["prompt_data_probs"] == [0.7, 0.3]
        assert not any("probs" in n.flag for n in notes)
    config, notes = migrate(["--pretrain", "m", "--dataset", "a.jsonl,b.jsonl", "--dataset_probs", "0.4,0.6"],
                            entry="train_sft")
    assert config["data"]["dataset"] == "a.jsonl,b.jsonl" and config["data"]["dataset_probs"] == [0.4, 0.6]
    _, notes = migrate(["--pretrain", "m", "--dataset", "a,b", "--dataset_probs", "0.4,0.6",
                        "--placeholder_token", "x"], entry="train_prm")
    assert any(n.flag == "--dataset_probs" and "no equivalent" in n.reason for n in notes)


# ----- stop-properly penalty --------------------------------------------------------------------------------------
def test_stop_properly_penalty_coef_loads_checked_and_translated():
    assert load_config(None, []).config.algo.stop_properly_penalty_coef is None
    for coef in ("0", "0.5", "1", "-0.5"):
        assert load_config(None, [f"--algo.stop_properly_penalty_coef={coef}"]).config.algo.stop_properly_penalty_coef \
            == float(coef)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\] .* or < 0 \(replaces it\), got 1.5"):
        load_config(None, ["--algo.stop_properly_penalty_coef=1.5"])
    for argv in (["--pretrain", "m", "--prompt_data", "p.jsonl", "--stop_properly_penalty_coef", "-0.5"],
                 ["--pretrain", "m", "--prompt_data", "p.jsonl", "--reward.stop_properly_penalty_coef", "-0.5"]):
        config, notes = migrate(argv)
        assert config["algo"]["stop_properly_penalty_coef"] == -0.5
        assert not any("stop_properly" in n.flag for n in notes)


# ----- advantage std normalisation --------------------------------------------------------------------------------
def test_advantage_std_norm_loads_and_translates():
    assert load_config(None, []).config.algo.advantage_std_norm is True
    cfg = load_config(None, ["--algo.advantage_std_norm=false", "--algo.advantage_estimator=reinforce",
                             "--rollout.n_samples_per_prompt=1", "--train.train_batch_size=8"]).config
    assert cfg.algo.advantage_std_norm is False
    for argv in (["--pretrain", "m", "--prompt_data", "p.jsonl", "--no_advantage_std_norm"],
                 ["--pretrain", "m", "--prompt_data", "p.jsonl", "--algo.advantage.no_std_norm"]):
        config, notes = migrate(argv)
        assert config["algo"]["advantage_std_norm"] is False
        assert not any("std_norm" in n.flag for n in notes)


# ----- DAPO dynamic sampling --------------------------------------------------------------------------------------
def test_dynamic_sampling_loads_checked_and_translated():
    rollout = load_config(None, ["--rollout.dynamic_filtering=true"]).config.rollout
    assert rollout.dynamic_filtering and rollout.dynamic_filtering_max_rounds == 10
    assert load_config(None, ["--rollout.dynamic_filtering=true", "--rollout.dynamic_filtering_max_rounds=1"]
                       ).config.rollout.dynamic_filtering_max_rounds == 1
    with pytest.raises(ConfigError, match=r"rollout.dynamic_filtering_max_rounds.*: must be >= 1"):
        load_config(None, ["--rollout.dynamic_filtering=true", "--rollout.dynamic_filtering_max_rounds=0"])
    with pytest.raises(ConfigError, match=r"a reward model scores later on its own ranks"):
        load_config(None, ["--rollout.dynamic_filtering=true", "--reward.pretrain=builtin:tiny-llama",
                           "--reward.reward_func_path=", "--layout.reward.gpus=1", "--slurm.gpus_per_node=2"])
    with pytest.raises(ConfigError, match=r"it needs n_samples_per_prompt >= 2"):
        load_config(None, ["--rollout.dynamic_filtering=true", "--rollout.n_samples_per_prompt=1",
                           "--algo.advantage_estimator=reinforce"])
    config, _ = migrate(["--pretrain", "m", "--prompt_data", "p.jsonl", "--remote_rm_url", "http://x",
                         "--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0.1", "0.9"])
    assert config["rollout"]["dynamic_filtering"] is True
    assert config["rollout"]["dynamic_filtering_reward_range"] == [0.1, 0.9]


# ----- partial rollouts -------------------------------------------------------------------------------------------
def test_partial_rollout_loads_and_refuses_what_it_cannot_continue():
    asynchronous = ["--rollout.async_queue=1", "--layout.colocate=false", "--slurm.gpus_per_node=2"]
    rollout = load_config(None, ["--rollout.partial_rollout=true", *asynchronous]).config.rollout
    assert rollout.partial_rollout and rollout.partial_rollout_max_new_tokens == 256
    assert load_config(None, []).config.rollout.partial_rollout is False, "off by default"
    refused = {
        "needs asynchronous training": [],
        "only single-turn responses are continued": ["--rollout.agent_func_path=agent.py"],
        "dynamic sampling filters finished groups": ["--rollout.dynamic_filtering=true"],
        "prompts with images are not continued": ["--data.max_images_per_prompt=1"],
        r"rollout.partial_rollout_max_new_tokens.*: must be >= 1": ["--rollout.partial_rollout_max_new_tokens=0"],
    }
    for words, extra in refused.items():
        queue = [] if words.startswith("needs") else asynchronous
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["--rollout.partial_rollout=true", *queue, *extra])
