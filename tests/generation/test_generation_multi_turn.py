"""Multi-turn rollouts with deterministic environments over the real hf engine and the tiny tokenizer."""

from __future__ import annotations

import asyncio
import re
import textwrap

import pytest
import torch

from hpc_rlhf.generation import AgentError, HFEngine, MultiTurnExecutor, SamplingParams, load_agent_class
from hpc_rlhf.generation.multi_turn import call_all

GUESSING_GAME = '''
import re

def judge(secret, action_text):
    """(feedback, done, reward) of one guess: the first digit in the action is the guess."""
    found = re.search(r"[0-9]", action_text)
    if found is None:
        return " no digit, guess again\\n", False, -0.5
    guess = int(found.group())
    if guess == secret:
        return " correct\\n", True, 1.0
    return (" higher\\n" if guess < secret else " lower\\n"), False, -abs(guess - secret) / 10


class AgentInstance:
    def __init__(self):
        self.secret = None

    def reset(self, state):
        self.secret = int(state["label"])
        return {"observation": state["observation"]}

    def step(self, state):
        feedback, done, reward = judge(self.secret, state["action_text"])
        return {"rewards": reward, "scores": float(done), "environment_feedback": feedback, "done": done,
                "extra_logs": {"turn": state["turn"]}}
'''

SCRIPTED = '''
class AgentInstance:
    """Rewrites the prompt, asks for 3-token answers after turn 0, and says done at turn 2."""

    {prefix}def reset(self, state):
        return {{"observation": "Q" + str(state["sample_index"]) + ":"}}

    {prefix}def step(self, state):
        turn = state["turn"]
        out = {{"rewards": float(turn), "environment_feedback": " feedback " + str(turn), "done": turn == 2,
               "extra_logs": {{"last_turn": turn}}}}
        if turn == 0:
            out["sampling_params"] = {{"max_new_tokens": 3}}
        return out
'''


@pytest.fixture
def write_agent(tmp_path):
    def write(source: str, name: str = "agent.py") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return str(path)
    return write


def judge(secret: int, action_text: str) -> tuple[str, bool, float]:
    """The guessing game's rule, restated here to check the trajectories independently."""
    found = re.search(r"[0-9]", action_text)
    if found is None:
        return " no digit, guess again\n", False, -0.5
    guess = int(found.group())
    if guess == secret:
        return " correct\n", True, 1.0
    return (" higher\n" if guess < secret else " lower\n"), False, -abs(guess - secret) / 10


def runs_of_mask(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each maximal run of equal values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_guessing_game_trajectories_are_consistent_token_for_token(make_model, tokenizer, write_agent):
    model = make_model(0)
    executor = MultiTurnExecutor(HFEngine(model), load_agent_class(write_agent(GUESSING_GAME)), tokenizer,
                                 max_turns=4, max_length=200)
    texts = ["Guess my digit: ", "Pick 0-9: ", "Number? "]
    labels = ["3", "7", "0"]
    prompt_ids = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=2024, ignore_eos=True)
    trajectories = executor.run(prompt_ids, params, prompt_texts=texts, labels=labels)
    assert len(trajectories) == 6
    seen_feedback = set()
    for k, traj in enumerate(trajectories):
        secret = int(labels[k // 2])
        assert traj.prompt_ids == prompt_ids[k // 2]
        runs = runs_of_mask(traj.action_mask)
        actions = [(s, e) for v, s, e in runs if v == 1]
        feedbacks = [(s, e) for v, s, e in runs if v == 0]
        assert traj.turn_boundaries == [s for s, _ in actions]
        assert all(e - s == 6 for s, e in actions)  # ignore_eos: every action uses its whole budget
        # each action but the last is followed by exactly the tokenized feedback of the rule above
        outcome = None
        for turn, (start, end) in enumerate(actions):
            outcome = judge(secret, tokenizer.decode(traj.response_ids[start:end], skip_special_tokens=True))
            if turn < len(actions) - 1:
                f_start, f_end = feedbacks[turn]
                assert f_start == end
                assert traj.response_ids[f_start:f_end] == tokenizer.encode(outcome[0], add_special_tokens=False)
                assert not outcome[1]
                seen_feedback.add(outcome[0])
        assert len(feedbacks) == len(actions) - 1  # nothing after the last action
        _, done, reward = outcome
        assert traj.reward == pytest.approx(reward) and traj.score == float(done)
        assert traj.finish_reason == ("stop" if done else "max_turns")
        assert traj.extra_logs == {"turn": len(actions) - 1}
        assert len(actions) == 4 or done
        # environment tokens carry log-prob 0; model tokens carry the teacher-forced log-prob given everything before
        ids = torch.tensor([traj.prompt_ids + traj.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(traj.prompt_ids) - 1:-1].double()
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(traj.response_ids)[:, None]).squeeze(-1)
        got = torch.tensor(traj.log_probs, dtype=torch.float64)
        mask = torch.tensor(traj.action_mask, dtype=torch.bool)
        assert torch.allclose(got[mask], ref[mask], atol=1e-5)
        assert torch.all(got[~mask] == 0)
    assert len(seen_feedback) >= 2  # the game answered in more than one way
    assert len({tuple(t.response_ids) for t in trajectories}) == 6


@pytest.mark.parametrize("prefix", ["", "async "])
def test_reset_rewrites_step_overrides_sampling_and_done_stops(make_model, tokenizer, write_agent, prefix):
    agent_cls = load_agent_class(write_agent(SCRIPTED.format(prefix=prefix), name=f"scripted_{bool(prefix)}.py"))
    executor = MultiTurnExecutor(HFEngine(make_model(0)), agent_cls, tokenizer, max_turns=5)
    prompt = tokenizer.encode("original prompt")  # starts with <s>
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=1, ignore_eos=True)
    first, second = executor.run([prompt], params)
    for sample_index, traj in enumerate((first, second)):
        assert traj.prompt_ids == [tokenizer.bos_token_id] + tokenizer.encode(f"Q{sample_index}:",
                                                                              add_special_tokens=False)
        feedback = [tokenizer.encode(f" feedback {t}", add_special_tokens=False) for t in (0, 1)]
        b = traj.turn_boundaries
        assert b == [0, 5 + len(feedback[0]), 5 + len(feedback[0]) + 3 + len(feedback[1])]
        assert traj.response_ids[5:b[1]] == feedback[0] and traj.response_ids[b[1] + 3:b[2]] == feedback[1]
        assert traj.action_mask == [1] * 5 + [0] * len(feedback[0]) + [1] * 3 + [0] * len(feedback[1]) + [1] * 3
        assert traj.finish_reason == "stop" and traj.reward == 2.0 and traj.score == 2.0
        assert traj.extra_logs == {"last_turn": 2}


def test_max_length_truncates_feedback_and_ends_the_trajectory(make_model, tokenizer, write_agent):
    agent_cls = load_agent_class(write_agent(SCRIPTED.format(prefix="")))
    prompt_len = len(tokenizer.encode("Q0:"))  # the rewritten prompt
    executor = MultiTurnExecutor(HFEngine(make_model(0)), agent_cls, tokenizer, max_turns=5,
                                 max_length=prompt_len + 5 + 4)
    (traj,) = executor.run([tokenizer.encode("x")], SamplingParams(max_new_tokens=5, temperature=0.0,
                                                                   ignore_eos=True))
    feedback = tokenizer.encode(" feedback 0", add_special_tokens=False)[:4]
    assert traj.response_ids[5:] == feedback and traj.action_mask == [1] * 5 + [0] * 4
    assert len(traj.prompt_ids) + len(traj.response_ids) == prompt_len + 9
    assert traj.finish_reason == "length" and traj.turn_boundaries == [0]


def test_max_turns_ends_without_trailing_feedback(make_model, tokenizer, write_agent):
    agent_cls = load_agent_class(write_agent(GUESSING_GAME))
    executor = MultiTurnExecutor(HFEngine(make_model(0)), agent_cls, tokenizer, max_turns=1)
    trajectories = executor.run([tokenizer.encode("guess: ")], SamplingParams(max_new_tokens=4, temperature=0.0,
                                                                              ignore_eos=True),
                                labels=["99"])  # a secret no single digit matches
    assert trajectories[0].action_mask == [1] * 4 and trajectories[0].finish_reason == "max_turns"


BAD_STEPS = [
    ('{"rewards": 1.0, "environment_feedback": "", "done": True, "reward_extra": 1}',
     r"unknown key\(s\) \['reward_extra'\]"),
    ('{"rewards": 1.0, "done": True}', r"missing key\(s\) \['environment_feedback'\]"),
    ('{"rewards": "high", "environment_feedback": "", "done": True}', r"rewards='high'"),
    ('{"rewards": 1.0, "environment_feedback": 3, "done": True}', "environment_feedback of type int"),
    ('{"rewards": 1.0, "environment_feedback": "", "done": 1}', r"done=1"),
    ('[1.0]', "must return a dict, got list"),
    ('{"rewards": 1.0, "environment_feedback": "", "done": False, "sampling_params": {"n": 4}}', "with 'n'"),
    ('{"rewards": 1.0, "environment_feedback": "", "done": False, "sampling_params": {"temprature": 1}}',
     "bad sampling_params.*temprature"),
    ('{"rewards": float("nan"), "environment_feedback": "", "done": False}', "finite number"),
]


@pytest.mark.parametrize("answer, message", BAD_STEPS)
def test_bad_step_answers_name_the_key(make_model, tokenizer, write_agent, answer, message):
    source = f'''
class AgentInstance:
    def reset(self, state):
        return {{"observation": state["observation"]}}

    def step(self, state):
        return {answer}
'''
    executor = MultiTurnExecutor(HFEngine(make_model(0)), load_agent_class(write_agent(source)), tokenizer,
                                 max_turns=3)
    with pytest.raises(AgentError, match=message):
        executor.run([tokenizer.encode("hi")], SamplingParams(max_new_tokens=2, temperature=0.0))


@pytest.mark.parametrize("answer, message", [('{"obs": "x"}', r"unknown key\(s\) \['obs'\]"),
                                             ("{}", "missing key 'observation'"),
                                             ('{"observation": 5}', "observation of type int")])
def test_bad_reset_answers_name_the_key(make_model, tokenizer, write_agent, answer, message):
    source = f'''
class AgentInstance:
    def reset(self, state):
        return {answer}

    def step(self, state):
        return {{"rewards": 0.0, "environment_feedback": "", "done": True}}
'''
    executor = MultiTurnExecutor(HFEngine(make_model(0)), load_agent_class(write_agent(source)), tokenizer,
                                 max_turns=2)
    with pytest.raises(AgentError, match=message):
        executor.run([tokenizer.encode("hi")], SamplingParams(max_new_tokens=2))


def test_call_all_awaits_coroutines_together_even_inside_a_running_loop():
    order = []

    async def slow(tag, delay):
        await asyncio.sleep(delay)
        order.append(tag)
        return tag

    calls = [lambda: slow("a", 0.05), lambda: "plain", lambda: slow("b", 0.0)]
    assert call_all(calls) == ["a", "plain", "b"] and order == ["b", "a"]  # concurrent, not one after another

    async def inside():
        return call_all([lambda: slow("c", 0.0)])

    assert asyncio.run(inside()) == ["c"]


def test_executor_arguments_are_checked(make_model, tokenizer, write_agent):
    agent_cls = load_agent_class(write_agent(GUESSING_GAME))
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        MultiTurnExecutor(HFEngine(make_model(0)), agent_cls, tokenizer, max_turns=0)
    executor = MultiTurnExecutor(HFEngine(make_model(0)), agent_cls, tokenizer, max_turns=2)
    with pytest.raises(ValueError, match="2 prompts, 1 prompt_texts and 2 labels"):
        executor.run([[1, 5], [1, 6]], SamplingParams(), prompt_texts=["a"], labels=["1", "2"])
