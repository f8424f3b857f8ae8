"""Process reward model and knowledge distillation: losses fall and the saved models beat the initial ones on held-out
step accuracy / distillation loss, measured here independently in float64 with plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def mean(values):
    values = list(values)
    return sum(values) / len(values)


@torch.no_grad()
def step_accuracy(path: Path, rows: list[dict], placeholder: str = "#") -> float:
    """Fraction of steps whose logit of "+" vs "-" at the step's placeholder matches the label."""
    model, tokenizer = _load(path)
    marker, good, bad = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (placeholder, "+", "-"))
    right = total = 0
    for row in rows:
        ids = tokenizer(row["input"])["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        positions = [i for i, token in enumerate(ids) if token == marker]
        for position, label in zip(positions, row["label"]):
            predicted = "+" if logits[position, good] > logits[position, bad] else "-"
            right += predicted == label
            total += 1
    return right / total


@torch.no_grad()
def distillation_loss(student_path: Path, teacher_path: Path, rows: list[dict]) -> float:
    """Token mean over the responses (+ eos) of -sum_v p_teacher(v) log p_student(v)."""
    student, tokenizer = _load(student_path)
    teacher, _ = _load(teacher_path)
    total = tokens = 0.0
    for row in rows:
        prompt = tokenizer(row["input"])["input_ids"]
        ids = prompt + tokenizer(row["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        predicting = slice(len(prompt) - 1, len(ids) - 1)
        p_teacher = torch.softmax(teacher(input_ids=torch.tensor([ids])).logits[0, predicting].double(), dim=-1)
        log_p_student = torch.log_softmax(student(input_ids=torch.tensor([ids])).logits[0, predicting].double(), -1)
        total -= float((p_teacher * log_p_student).sum())
        tokens += len(ids) - len(prompt)
    return total / tokens


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def test_prm_learns_to_label_held_out_steps(make_config, train, series, rows, data_dir, models):
    cfg = make_config("prm", train__max_iterations=90, train__max_epochs=3, eval__steps=30,
                      actor__learning_rate=2e-3)
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert losses[0] == pytest.approx(0.69, abs=0.05)  # two nearly equal logits: about log 2
    assert mean(losses[-15:]) < mean(losses[:15]) - 0.03
    held_out = rows(data_dir / "prm_test.jsonl")
    saved = Path(cfg.train.run_dir) / "hf" / "prm"
    initial, trained = step_accuracy(models["tiny"], held_out), step_accuracy(saved, held_out)
    assert trained > initial + 0.1 and trained > 0.6, (initial, trained)
    assert series(cfg.train.run_dir, "eval/accuracy")[-1][1] == pytest.approx(trained, abs=1e-9)


def test_kd_student_approaches_the_teacher(make_config, train, series, rows, data_dir, models):
    cfg = make_config("kd", train__max_iterations=30, eval__steps=15, eval__max_samples=50)
    train(cfg)
    kd_losses = [v for _, v in series(cfg.train.run_dir, "train/kd_loss")]
    assert mean(kd_losses[-5:]) < 0.7 * mean(kd_losses[:5])
    held_out = rows(data_dir / "sft_test.jsonl")[:50]
    initial = distillation_loss(models["tiny"], models["arith"], held_out)
    trained = distillation_loss(Path(cfg.train.run_dir) / "hf" / "actor", models["arith"], held_out)
    assert trained < initial - 1.0, (initial, trained)
    assert series(cfg.train.run_dir, "eval/kd_loss")[-1][1] == pytest.approx(trained, rel=1e-4)
