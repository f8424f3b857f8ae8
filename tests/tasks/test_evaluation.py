"""Held-out evaluation: batched, left-padded generation equals one-prompt-at-a-time greedy decoding, and the
accuracy is the reward function's mean score (labels chosen so the expected accuracy is known exactly)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_rlhf.data.prompts import PromptExample, load_prompts
from hpc_rlhf.tasks import chat_arithmetic
from hpc_rlhf.tasks.evaluation import evaluate, generate_responses
from hpc_rlhf.builtin_models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    rows = chat_arithmetic.generate_examples("sum2", 6, seed=0) + chat_arithmetic.generate_examples("sum3", 4, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _greedy_one(model, ids: list[int], eos: int) -> list[int]:
    """Reference decoding: one unpadded prompt, argmax token by token, stop after eos."""
    out: list[int] = []
    sequence = torch.tensor([ids])
    for _ in range(MAX_NEW):
        with torch.no_grad():
            token = int(model(sequence).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    return out


def test_batched_left_padded_greedy_matches_single_prompt_decoding(tiny, data_file):
    _, model, tokenizer = tiny
    examples = load_prompts(data_file, label_key="label", apply_chat_template=True, tokenizer=tokenizer)
    prompts = [e.prompt for e in examples]
    assert len({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}) > 1  # padding happens
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=4)
    single = [_greedy_one(model, tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
              for p in prompts]
    assert batched == single


def test_accuracy_is_the_mean_score_with_known_labels(tiny, data_file):
    """Label each prompt with the model's own greedy answer (right) or that answer + 1 (wrong): 3 of 10 right."""
    _, model, tokenizer = tiny
    examples = load_prompts(data_file, label_key="label", apply_chat_template=True, tokenizer=tokenizer)
    responses = generate_responses(model, tokenizer, [e.prompt for e in examples], max_new_tokens=MAX_NEW)
    answers = [chat_arithmetic.parse_answer(tokenizer.decode(r))[0] for r in responses]
    right = set(range(3))
    relabelled = []
    for i, (example, answer) in enumerate(zip(examples, answers)):
        own = answer if answer is not None else 0
        label = own if (i in right and answer is not None) else own + 1
        relabelled.append(PromptExample(prompt=example.prompt, label=str(label), index=i))
    expected = sum(1 for i in right if answers[i] is not None) / len(examples)

    result = evaluate(model, tokenizer, relabelled, reward_func=chat_arithmetic.reward_func, max_new_tokens=MAX_NEW,
                      batch_size=3)
    assert result["prompts"] == 10 and result["greedy"]["responses"] == 10
    assert result["greedy"]["accuracy"] == pytest.approx(expected)
    lengths = [len(r) for r in responses]
    assert result["greedy"]["mean_response_tokens"] == pytest.approx(sum(lengths) / 10)
    eos = tokenizer.eos_token_id
    assert result["greedy"]["ended_with_eos"] == pytest.approx(sum(r[-1] == eos for r in responses) / 10)
    assert "sampled" not in result


def test_sampled_accuracy_counts_every_sample_and_repeats_with_the_seed(tiny, data_file):
    _, model, tokenizer = tiny
    examples = load_prompts(data_file, label_key="label", apply_chat_template=True, tokenizer=tokenizer)
    lines: list[str] = []
    first = evaluate(model, tokenizer, examples, reward_func=chat_arithmetic.reward_func, max_new_tokens=MAX_NEW,
                     samples=3, temperature=1.0, seed=7, log=lines.append)
    again = evaluate(model, tokenizer, examples, reward_func=chat_arithmetic.reward_func, max_new_tokens=MAX_NEW,
                     samples=3, temperature=1.0, seed=7)
    assert first["sampled"]["responses"] == 30 and first["sampled"]["samples_per_prompt"] == 3
    for key in ("accuracy", "mean_response_tokens", "ended_with_eos"):
        assert first["sampled"][key] == again["sampled"][key]
    assert any(line.startswith("sampled: 30/30 responses") for line in lines)
    assert any(line.startswith("greedy: 10/10 responses") for line in lines)


def test_bad_arguments_are_clear(tiny):
    _, model, tokenizer = tiny
    example = [PromptExample(prompt="1+1=", label="2", index=0)]
    with pytest.raises(ValueError, match="sampled accuracy needs temperature > 0"):
        evaluate(model, tokenizer, example, reward_func=chat_arithmetic.reward_func, samples=2, temperature=0)
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, tokenizer, [], reward_func=chat_arithmetic.reward_func)


def test_eval_tool_writes_json(tiny, data_file, tmp_path):
    folder, _, _ = tiny
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "tools/eval_accuracy.py", str(folder), "--data", str(data_file),
                             "--limit", "4", "--max-new-tokens", "3", "--samples", "2", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert numbers["prompts"] == 4 and numbers["max_new_tokens"] == 3
    assert numbers["greedy"]["responses"] == 4 and numbers["sampled"]["responses"] == 8
    assert 0.0 <= numbers["greedy"]["accuracy"] <= 1.0
    assert "greedy accuracy" in result.stdout
    assert "greedy: 4/4 responses" in result.stderr


def test_eval_tool_names_a_missing_data_file(tiny, tmp_path):
    folder, _, _ = tiny
    result = subprocess.run([sys.executable, "tools/eval_accuracy.py", str(folder), "--data",
                             str(tmp_path / "none.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "none.jsonl" in result.stderr.strip().splitlines()[-1]
