"""Loading and calling user reward functions: every spec form, normalisation of results, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from hpc_rlhf.rewards import RewardError, RewardFunction, load_reward_func
from hpc_rlhf.rewards.reward_func import split_spec

QUERIES = ["1+1=2", "2+2=5", "3+3=six"]
PROMPTS = ["1+1=", "2+2=", "3+3="]
LABELS = ["2", "4", "6"]


def test_file_reward_func_with_dict_result(length_reward_file):
    result = RewardFunction(str(length_reward_file))(QUERIES, PROMPTS, LABELS)
    assert torch.equal(result.rewards, torch.tensor([1.0, 1.0, 3.0]))
    assert torch.equal(result.scores, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(result.extra_logs["response_len"], torch.tensor([1.0, 1.0, 3.0]))
    assert torch.equal(result.extra_logs["batch_size"], torch.tensor([3.0, 3.0, 3.0]))


def test_file_with_named_function_returning_a_tensor(write_reward_file):
    path = write_reward_file(
        "import torch\n"
        "def reward_func(q, p, l):\n    raise AssertionError('the named function must be used')\n"
        "def exact(queries, prompts, labels):\n"
        "    return torch.tensor([float(q[len(p):] == l) for q, p, l in zip(queries, prompts, labels)])\n")
    result = RewardFunction(f"{path}:exact")(QUERIES, PROMPTS, LABELS)
    assert torch.equal(result.rewards, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(result.scores, result.rewards)


def test_module_forms_load_the_packaged_arithmetic_task():
    by_module = RewardFunction("hpc_rlhf.tasks.arithmetic")(QUERIES, PROMPTS, LABELS)
    by_function = RewardFunction("hpc_rlhf.tasks.arithmetic:reward_func")(QUERIES, PROMPTS, LABELS)
    assert torch.equal(by_module.scores, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(by_module.rewards, by_function.rewards)
    assert set(by_module.extra_logs) == {"accuracy", "well_formed"}


def test_labels_may_be_missing(write_reward_file):
    path = write_reward_file("def reward_func(queries, prompts, labels):\n"
                             "    assert labels == [None, None]\n    return [0.5, 0.25]\n")
    assert torch.equal(RewardFunction(str(path))(["a", "b"], ["a", "b"]).rewards, torch.tensor([0.5, 0.25]))


def test_two_files_with_the_same_name_do_not_clash(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "reward.py").write_text("def reward_func(q, p, l):\n    return [1.0] * len(q)\n")
    (tmp_path / "b" / "reward.py").write_text("def reward_func(q, p, l):\n    return [2.0] * len(q)\n")
    first = RewardFunction(str(tmp_path / "a" / "reward.py"))(["x"], ["x"], ["y"])
    second = RewardFunction(str(tmp_path / "b" / "reward.py"))(["x"], ["x"], ["y"])
    assert (first.rewards.item(), second.rewards.item()) == (1.0, 2.0)


def test_a_file_defining_a_dataclass_loads(write_reward_file):
    path = write_reward_file(
        "from dataclasses import dataclass\n@dataclass\nclass Weights:\n    scale: float = 3.0\n"
        "def reward_func(q, p, l):\n    return [Weights().scale] * len(q)\n")
    assert RewardFunction(str(path))(["a"], ["a"], [None]).rewards.tolist() == [3.0]


def test_split_spec():
    assert split_spec("dir/r.py") == ("dir/r.py", "reward_func")
    assert split_spec("dir/r.py:fn") == ("dir/r.py", "fn")
    assert split_spec("pkg.mod:fn_2") == ("pkg.mod", "fn_2")
    assert split_spec("pkg.mod") == ("pkg.mod", "reward_func")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(RewardError, match="does not exist") as error:
        load_reward_func(str(tmp_path / "nope.py"))
    assert "nope.py" in str(error.value)


def test_missing_function_and_non_callable(write_reward_file):
    path = write_reward_file("def other(q, p, l):\n    return []\nreward_func = 3\n")
    with pytest.raises(RewardError, match="defines no 'score'"):
        load_reward_func(f"{path}:score")
    with pytest.raises(RewardError, match=r"is not callable \(type int\)"):
        load_reward_func(str(path))


def test_wrong_signature_and_broken_file(write_reward_file):
    path = write_reward_file("def reward_func(queries):\n    return []\n", "one_arg.py")
    with pytest.raises(RewardError, match="cannot be called as reward_func"):
        load_reward_func(str(path))
    broken = write_reward_file("import not_a_module_anywhere\n", "broken.py")
    with pytest.raises(RewardError, match="importing reward file .*broken.py failed: ModuleNotFoundError"):
        load_reward_func(str(broken))
    assert not any("broken" in name for name in sys.modules if name.startswith("hpc_rlhf_user_reward_"))


def test_unknown_module():
    with pytest.raises(RewardError, match="cannot import reward module 'no_such_pkg.rewards'"):
        load_reward_func("no_such_pkg.rewards:score")


@pytest.mark.parametrize("body, fragment", [
    ("return [1.0]", "rewards has 1 values, expected 3"),
    ("return {'rewards': [0.0, float('nan'), 1.0]}", "rewards[1] is nan"),
    ("return 'good'", "returned str"),
    ("return {'scores': [1.0, 1.0, 1.0]}", "no 'rewards'"),
])
def test_bad_results_raise_naming_the_function(write_reward_file, body, fragment):
    path = write_reward_file(f"def reward_func(queries, prompts, labels):\n    {body}\n")
    with pytest.raises(RewardError) as error:
        RewardFunction(str(path))(QUERIES, PROMPTS, LABELS)
    assert fragment in str(error.value)
    assert str(path) in str(error.value)


def test_empty_batch_does_not_call_the_function(write_reward_file):
    path = write_reward_file("def reward_func(q, p, l):\n    raise AssertionError('called')\n")
    assert len(RewardFunction(str(path))([], [], [])) == 0
