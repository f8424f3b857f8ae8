"""The single-turn executor, the Trajectory record, agent-file loading and executor selection."""

from __future__ import annotations

import pytest

from hpc_rlhf.generation import (
    AgentError,
    HFEngine,
    MultiTurnExecutor,
    SamplingParams,
    SingleTurnExecutor,
    Trajectory,
    load_agent_class,
    make_executor,
)

MINIMAL_AGENT = '''
class AgentInstance:
    def reset(self, state):
        return {"observation": state["observation"]}

    def step(self, state):
        return {"rewards": 0.0, "environment_feedback": "", "done": True}
'''


def test_single_turn_trajectories_mirror_the_engine_samples(make_model, prompts):
    engine = HFEngine(make_model(0))
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=9)
    expected = engine.generate(prompts, params)
    trajectories = SingleTurnExecutor(engine).run(prompts, params, prompt_texts=["unused"] * 4, labels=[None] * 4)
    assert len(trajectories) == 12
    for k, traj in enumerate(trajectories):
        sample = expected[k // 3][k % 3]
        assert traj.prompt_ids == prompts[k // 3] == sample.prompt_ids
        assert traj.response_ids == sample.response_ids and traj.log_probs == sample.log_probs
        assert traj.action_mask == [1] * len(sample.response_ids) and traj.turn_boundaries == [0]
        assert traj.reward is None and traj.score is None and traj.finish_reason == sample.finish_reason


def test_trajectory_checks_per_token_lengths():
    with pytest.raises(ValueError, match="2 response tokens, 1 mask entries and 2 log-probs"):
        Trajectory(prompt_ids=[1], response_ids=[4, 5], action_mask=[1], log_probs=[0.0, 0.0])


def test_load_agent_class_errors_name_the_problem(tmp_path):
    with pytest.raises(AgentError, match=r"agent file '.*missing.py' does not exist"):
        load_agent_class(str(tmp_path / "missing.py"))
    no_class = tmp_path / "no_class.py"
    no_class.write_text("class Agent:\n    pass\n")
    with pytest.raises(AgentError, match="defines no class AgentInstance"):
        load_agent_class(str(no_class))
    no_step = tmp_path / "no_step.py"
    no_step.write_text("class AgentInstance:\n    def reset(self, state):\n        return {}\n")
    with pytest.raises(AgentError, match=r"has no step\(\) method"):
        load_agent_class(str(no_step))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(AgentError, match="importing .* failed: ModuleNotFoundError"):
        load_agent_class(str(broken))


def test_two_agent_files_with_one_name_do_not_collide(tmp_path):
    first, second = tmp_path / "a" / "env.py", tmp_path / "b" / "env.py"
    for path, tag in ((first, "A"), (second, "B")):
        path.parent.mkdir()
        path.write_text(MINIMAL_AGENT + f"\nTAG = {tag!r}\n")
    a, b = load_agent_class(str(first)), load_agent_class(str(second))
    assert a is not b and a.__module__ != b.__module__


def test_make_executor_picks_the_executor(make_model, tokenizer, tmp_path):
    engine = HFEngine(make_model(0))
    assert isinstance(make_executor(engine, tokenizer), SingleTurnExecutor)
    agent_file = tmp_path / "agent.py"
    agent_file.write_text(MINIMAL_AGENT)
    executor = make_executor(engine, tokenizer, agent_func_path=str(agent_file), max_turns=3, max_length=99)
    assert isinstance(executor, MultiTurnExecutor)
    assert executor.max_turns == 3 and executor.max_length == 99 and executor.agent_cls.__name__ == "AgentInstance"
