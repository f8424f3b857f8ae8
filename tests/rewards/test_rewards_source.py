"""make_reward_source / reward_source_from_config: exactly one source, each kind built and callable alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hpc_rlhf.config.schema import ConfigError, RewardConfig
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.rewards import (
    RemoteReward,
    RewardError,
    RewardFunction,
    RewardModel,
    make_reward_source,
    reward_source_from_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kwargs, named", [
    ({}, "got none"),
    ({"reward_func_path": "r.py", "remote_url": "http://h/"}, "got reward_func_path, remote_url"),
    ({"remote_url": "http://h/", "reward_model_path": "/m"}, "got remote_url, reward_model_path"),
    ({"reward_func_path": "r.py", "remote_url": "http://h/", "reward_model_path": "/m"},
     "got reward_func_path, remote_url, reward_model_path"),
])
def test_exactly_one_source(kwargs, named):
    with pytest.raises(RewardError, match="give exactly one reward source") as error:
        make_reward_source(**kwargs)
    assert named in str(error.value)


def test_each_source_kind_and_its_settings(length_reward_file, tiny_reward_model_dir):
    function = make_reward_source(reward_func_path=str(length_reward_file))
    assert isinstance(function, RewardFunction)
    assert function(["ab"], ["a"], ["b"]).rewards.tolist() == [1.0]

    remote = make_reward_source(remote_url="http://127.0.0.1:1/", remote_timeout_s=2.5, remote_max_retries=5,
                                remote_backoff_s=0.5, remote_batch_size=7)
    assert isinstance(remote, RemoteReward)
    assert (remote.timeout_s, remote.max_retries, remote.backoff_s, remote.batch_size) == (2.5, 5, 0.5, 7)

    model = make_reward_source(reward_model_path=str(tiny_reward_model_dir), micro_batch_size=3, dtype="float32")
    assert isinstance(model, RewardModel) and model.micro_batch_size == 3
    assert model(["x"], ["x"], None, token_ids=[[4, 5]]).rewards.shape == (1,)


def test_from_config_default_scores_the_arithmetic_task(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the default reward_func_path is relative to the repository root
    source = reward_source_from_config(RewardConfig())
    result = source(["<s>2+3=5</s>", "2+3=6</s>", "2+3=x"], ["2+3="] * 3, ["5", "5", "5"])
    assert torch.allclose(result.rewards, torch.tensor([1.0, 0.1, 0.0]))
    assert result.scores.tolist() == [1.0, 0.0, 0.0]


def test_from_config_remote_and_ambiguous():
    remote = reward_source_from_config(RewardConfig(reward_func_path=None, remote_url="http://127.0.0.1:9/",
                                                    remote_timeout_s=4.0, remote_max_retries=1))
    assert isinstance(remote, RemoteReward) and (remote.timeout_s, remote.max_retries) == (4.0, 1)
    with pytest.raises(RewardError, match="got reward_func_path, reward_model_path"):
        reward_source_from_config(replace(RewardConfig(), pretrain="/some/model"))


def test_several_remote_urls_from_yaml_list_or_command_line_string(tmp_path):
    urls = ["http://127.0.0.1:9/", "http://127.0.0.1:10/score"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text("reward:\n  reward_func_path: null\n  remote_url:\n"
                           + "".join(f"    - {url}\n" for url in urls))
    from_yaml = load_config(config_file).config.reward
    from_cli = load_config(None, ["--reward.reward_func_path=", f"--reward.remote_url={','.join(urls)}"]).config.reward
    assert from_yaml.remote_url == urls and from_cli.remote_url == ",".join(urls)
    for reward in (from_yaml, from_cli):
        remote = reward_source_from_config(reward)
        assert isinstance(remote, RemoteReward) and remote.urls == urls
    single = load_config(None, ["--reward.reward_func_path=", f"--reward.remote_url={urls[0]}"]).config.reward
    assert single.remote_url == urls[0] and reward_source_from_config(single).urls == [urls[0]]
    config_file.write_text("reward:\n  reward_func_path: null\n  remote_url: [http://h/, 8000]\n")
    with pytest.raises(ConfigError, match=r"reward.remote_url\[1\] .*expected a string, got int 8000"):
        load_config(config_file)
