"""The config tree: YAML + overrides + validation, and the entry point's --help / --print-config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpc_rlhf.config.schema import Config, ConfigError
from hpc_rlhf.config.loading import config_to_dict, config_to_yaml, describe_keys, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def leaf_keys(obj, prefix=""):
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    loaded = load_config(None, [])
    assert loaded.config == Config()
    assert loaded.sources == {}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_prints(path: Path):
    result = run_train("--config", str(path), "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == config_to_dict(load_config(path).config)


def test_printed_config_loads_back_identically(tmp_path: Path):
    original = load_config(REPO / "configs" / "ppo_70b.yaml").config
    again = load_config(write_config(tmp_path, config_to_yaml(original))).config
    assert again == original


def test_help_lists_every_key_with_default():
    result = run_train("--help")
    assert result.returncode == 0
    for key in leaf_keys(Config()):
        assert f"--{key} " in result.stdout, key
    assert "--train.seed" in result.stdout and "default 42" in result.stdout
    assert len([line for line in describe_keys() if line.startswith("  --")]) == len(leaf_keys(Config()))


def test_config_docs_are_current():
    result = subprocess.run([sys.executable, "tools/gen_config_docs.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_misspelled_key_names_key_file_and_suggestion(tmp_path: Path):
    path = write_config(tmp_path, "actor:\n  learning_rat: 1.0e-6\n")
    result = run_train("--config", str(path), "--print-config")
    assert result.returncode == 2
    assert "actor.learning_rat" in result.stderr and str(path) in result.stderr
    assert "did you mean actor.learning_rate?" in result.stderr


def test_unknown_section(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"actr \(.*bad.yaml\): unknown key \(did you mean actor\?\)"):
        load_config(write_config(tmp_path, "actr:\n  pretrain: x\n"))


def test_wrong_type_names_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train.seed \(.*bad.yaml\): expected int, got str 'abc'"):
        load_config(write_config(tmp_path, "train:\n  seed: abc\n"))
    with pytest.raises(ConfigError, match=r"logger.plot .*expected bool, got int 3"):
        load_config(None, ["--logger.plot=3"])
    with pytest.raises(ConfigError, match=r"slurm.time .*quote it"):
        load_config(write_config(tmp_path, "slurm:\n  time: 24:00:00\n"))


def test_all_errors_are_reported_together(tmp_path: Path):
    path = write_config(tmp_path, "train:\n  seed: x\n  device: tpu\nactor:\n  lr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.seed" in message and "train.device" in message and "actor.lr" in message
    assert "'tpu' is not one of auto, cpu, cuda" in message


def test_layout_that_does_not_add_up_shows_arithmetic(tmp_path: Path):
    path = write_config(tmp_path, """
layout:
  colocate: false
  generator: {gpus: 16, tp: 2}
  actor: {gpus: 16}
  critic: {gpus: 8}
  reward: {gpus: 4}
  reference: {gpus: 4}
reward: {pretrain: /m/rm, reward_func_path: null}
algo: {advantage_estimator: gae, init_kl_coef: 0.01}
slurm: {nodes: 2, gpus_per_node: 8}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert ("generator.gpus=16 + actor.gpus=16 + critic.gpus=8 + reward.gpus=4 + reference.gpus=4 = 48 ranks, "
            "but the job has slurm.nodes x slurm.gpus_per_node = 2 x 8 = 16") in str(err.value)
    assert str(path) in str(err.value)


def test_tp_must_divide_generators_and_nodes():
    with pytest.raises(ConfigError, match=r"generator.gpus=6 is not a multiple of generator.tp=4"):
        load_config(None, ["--layout.colocate=false", "--layout.generator.gpus=6", "--layout.generator.tp=4",
                           "--layout.actor.gpus=2", "--slurm.gpus_per_node=8", "--vllm.backend=vllm"])
    with pytest.raises(ConfigError, match=r"generator.tp=3 must divide slurm.gpus_per_node=8"):
        load_config(None, ["--layout.colocate=false", "--layout.generator.gpus=6", "--layout.generator.tp=3",
                           "--layout.actor.gpus=2", "--slurm.gpus_per_node=8", "--vllm.backend=vllm"])


def test_colocated_roles_must_span_the_job():
    with pytest.raises(ConfigError, match=r"colocated roles must each span .* 1 x 2 = 2 ranks; generator.gpus=1"):
        load_config(None, ["--slurm.gpus_per_node=2", "--layout.actor.gpus=2"])


def test_critic_without_ppo_and_ppo_without_critic():
    with pytest.raises(ConfigError, match=r"layout.critic.gpus \(command line\): a critic is only used by PPO"):
        load_config(None, ["--layout.critic.gpus=1"])
    with pytest.raises(ConfigError, match=r"critic.pretrain .*only used by PPO"):
        load_config(None, ["--critic.pretrain=/m/critic"])
    with pytest.raises(ConfigError, match=r"gae \(PPO\) needs a critic"):
        load_config(None, ["--algo.advantage_estimator=gae"])
    load_config(None, ["--algo.advantage_estimator=gae", "--layout.critic.gpus=1"])


def test_kl_needs_reference_and_group_estimators_need_groups():
    with pytest.raises(ConfigError, match=r"KL needs a reference model"):
        load_config(None, ["--algo.init_kl_coef=0.01"])
    with pytest.raises(ConfigError, match=r"reference group is unused"):
        load_config(None, ["--layout.reference.gpus=1"])
    with pytest.raises(ConfigError, match=r"needs n_samples_per_prompt >= 2 \(got 1\)"):
        load_config(None, ["--rollout.n_samples_per_prompt=1"])
    load_config(None, ["--algo.advantage_estimator=reinforce", "--rollout.n_samples_per_prompt=1",
                       "--train.train_batch_size=8"])


def test_reward_sources_are_exclusive():
    with pytest.raises(ConfigError, match=r"set exactly one of .* \(set: reward.reward_func_path, reward.remote_url\)"):
        load_config(None, ["--reward.remote_url=http://127.0.0.1:1/"])
    with pytest.raises(ConfigError, match=r"a reward model needs ranks"):
        load_config(None, ["--reward.pretrain=/m/rm", "--reward.reward_func_path="])


def test_batch_arithmetic():
    with pytest.raises(ConfigError, match=r"8 x 4 = 32 samples is not a multiple of train_batch_size=12"):
        load_config(None, ["--train.train_batch_size=12"])


def test_colocated_async_needs_both_halves_resident_and_no_collectives_in_the_thread():
    ok = ["--rollout.async_queue=1", "--vllm.enable_sleep=false"]
    cfg = load_config(None, ok).config
    assert cfg.layout.colocate and cfg.rollout.async_queue == 1
    refusals = {
        "--rollout.async_queue=2": r"rollout.async_queue .*: colocated, generation runs one iteration ahead at most",
        "--vllm.enable_sleep=true": r"vllm.enable_sleep .*: colocated async .* set vllm.enable_sleep: false",
        "--ds.enable_sleep=true": r"ds.enable_sleep .*: colocated async .* set ds.enable_sleep: false",
        "--rollout.dynamic_filtering=true": r"rollout.dynamic_filtering .*: dynamic filtering .* layout.colocate: false",
        "--rollout.partial_rollout=true": r"rollout.partial_rollout .*: partial rollouts .*layout.colocate: false",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*ok, override])
    with pytest.raises(ConfigError, match=r"layout.generator.tp .*: colocated async .* generator.tp: 1"):
        load_config(None, [*ok, "--vllm.backend=vllm", "--layout.generator.tp=2", "--layout.actor.gpus=2",
                           "--slurm.gpus_per_node=2"])


def test_override_forms():
    loaded = load_config(None, ["--actor.learning_rate", "1e-5", "--logger.plot", "--train.run_dir=/x/y",
                                "--critic.pretrain=", "--algo.reward_clip_range=[-5, 5]", "--slurm.time=24:00:00",
                                "--data.label_key=null"])
    cfg = loaded.config
    assert cfg.actor.learning_rate == 1e-5 and isinstance(cfg.actor.learning_rate, float)
    assert cfg.logger.plot is True and cfg.train.run_dir == "/x/y" and cfg.critic.pretrain is None
    assert cfg.algo.reward_clip_range == [-5.0, 5.0] and cfg.slurm.time == "24:00:00"
    assert cfg.data.label_key is None
    assert loaded.sources["actor.learning_rate"] == "command line"


def test_override_beats_file(tmp_path: Path):
    path = write_config(tmp_path, "train:\n  seed: 3\n")
    loaded = load_config(path, ["--train.seed=4"])
    assert loaded.config.train.seed == 4 and loaded.sources["train.seed"] == "command line"


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"expected --section.key=value"):
        load_config(None, ["seed=3"])


def test_images_need_a_critic_free_unpacked_ppo_run(tmp_path: Path):
    path = write_config(tmp_path, """
data: {max_images_per_prompt: 1}
train: {packing_samples: true}
rollout: {agent_func_path: env.py}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.max_images_per_prompt" in message and "no train.packing_samples" in message
    assert "no multi-turn agent" in message
    load_config(write_config(tmp_path, "data: {max_images_per_prompt: 1}\n"))  # GRPO with a reward function: fine
