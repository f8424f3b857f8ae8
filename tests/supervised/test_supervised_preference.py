"""Reward model, DPO / IPO / cDPO and KTO: known first-step losses, falling losses, and saved models that beat the
initial one on held-out preference accuracy (measured here independently, in float64, with plain transformers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# ----- reward model -----------------------------------------------------------------------------------------------
@torch.no_grad()
def reward_scores(path: Path, pairs: list[dict], key: str) -> torch.Tensor:
    """Score at the last token (eos) of prompt + response, from the saved sequence classifier's backbone and head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    scores = []
    for pair in pairs:
        ids = tokenizer(pair["input"])["input_ids"] + tokenizer(pair[key] + tokenizer.eos_token,
                                                                add_special_tokens=False)["input_ids"]
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        scores.append(float(model.score(hidden[0, -1].double().float())))
    return torch.tensor(scores, dtype=torch.float64)


def test_reward_model_learns_held_out_preferences(make_config, train, series, rows, data_dir, models):
    from hpc_rlhf.rewards import RewardModel

    cfg = make_config("rm", train__max_iterations=90, train__max_epochs=3, eval__steps=30, actor__learning_rate=2e-3)
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert mean(losses[-15:]) < mean(losses[:15]) - 0.05
    saved = Path(cfg.train.run_dir) / "hf" / "reward"
    pairs = rows(data_dir / "pairs_test.jsonl")
    chosen, rejected = reward_scores(saved, pairs, "chosen"), reward_scores(saved, pairs, "rejected")
    accuracy = float((chosen > rejected).double().mean())
    initial = reward_scores(models["reward"], pairs, "chosen") > reward_scores(models["reward"], pairs, "rejected")
    assert accuracy > float(initial.double().mean()) + 0.1 and accuracy > 0.62, accuracy
    assert series(cfg.train.run_dir, "eval/accuracy")[-1][1] == pytest.approx(accuracy, abs=1e-9)

    # The stored statistics are those of the held-out scores, so RewardModel's normalised scores there are standard.
    config = json.loads((saved / "config.json").read_text())
    both = torch.cat([chosen, rejected])
    assert config["reward_mean"] == pytest.approx(float(both.mean()), rel=1e-4)
    assert config["reward_std"] == pytest.approx(float(both.std(unbiased=False)), rel=1e-4)
    normalised = RewardModel(saved).score_sequences(
        [RewardModel(saved).tokenizer(p["input"])["input_ids"] + RewardModel(saved).tokenizer(
            p["chosen"] + "</s>", add_special_tokens=False)["input_ids"] for p in pairs[:20]])
    torch.testing.assert_close(normalised.double(), (chosen[:20] - config["reward_mean"]) / config["reward_std"],
                               rtol=1e-4, atol=1e-4)


# ----- DPO / IPO / cDPO -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type, label_smoothing, expected", [
    ("dpo", 0.0, math.log(2.0)),          # policy = reference: h = 0, -log sigmoid(0)
    ("dpo", 0.2, math.log(2.0)),          # cDPO: 0.8 log 2 + 0.2 log 2
    ("ipo", 0.0, (1 / (2 * 0.1)) ** 2),   # (0 - 1 / (2 beta))^2 with beta = 0.1
])
def test_first_step_loss_is_the_value_at_the_reference(make_config, train, series, loss_type, label_smoothing,
                                                       expected):
    cfg = make_config("dpo", train__max_iterations=1, eval__data="", pref__loss_type=loss_type,
                      pref__label_smoothing=label_smoothing, ckpt__save_hf_model="false")
    train(cfg)
    ((_, loss),) = series(cfg.train.run_dir, "train/loss")
    assert loss == pytest.approx(expected, rel=1e-5)
    ((_, accuracy),) = series(cfg.train.run_dir, "train/accuracy")
    assert accuracy == 0.0  # equal implicit rewards: no pair is strictly preferred yet


def test_dpo_learns_held_out_preferences(make_config, train, series, rows, data_dir, models, measure):
    cfg = make_config("dpo", train__max_iterations=40, eval__steps=20)
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert mean(losses[-8:]) < mean(losses[:8]) - 0.03
    eval_accuracy = [v for _, v in series(cfg.train.run_dir, "eval/accuracy")]
    assert eval_accuracy[-1] > 0.6
    pairs = rows(data_dir / "pairs_test.jsonl")[:120]
    initial = measure.preference_accuracy(models["tiny"], pairs)
    trained = measure.preference_accuracy(Path(cfg.train.run_dir) / "hf" / "actor", pairs)
    assert trained > initial + 0.08, (initial, trained)


def test_precomputed_reference_log_probs_give_the_same_training(make_config, train, series, rows, data_dir, models,
                                                                measure, tmp_path):
    """Columns of reference log-probs (computed here, float64) replace the reference model, step for step."""
    model, tokenizer = measure.load_causal_lm(models["tiny"])
    table = rows(data_dir / "pairs_train.jsonl")[:96]
    for row in table:
        row["ref_chosen"] = measure.response_log_prob(model, tokenizer, row["input"], row["chosen"])
        row["ref_rejected"] = measure.response_log_prob(model, tokenizer, row["input"], row["rejected"])
    dataset = tmp_path / "pairs_with_ref.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in table))
    common = dict(train__max_iterations=3, eval__data="", data__dataset=str(dataset), ckpt__save_hf_model="false")
    with_model = make_config("dpo", run_dir=tmp_path / "model", **common)
    precomputed = make_config("dpo", run_dir=tmp_path / "columns", pref__ref_chosen_logps_key="ref_chosen",
                              pref__ref_rejected_logps_key="ref_rejected", **common)
    train(with_model)
    train(precomputed)
    for name in ("train/loss", "train/reward_margin"):
        a = [v for _, v in series(with_model.train.run_dir, name)]
        b = [v for _, v in series(precomputed.train.run_dir, name)]
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), name


@pytest.mark.timeout(240)
def test_dpo_on_two_ranks_matches_one_rank(make_config, train, models, data_dir, tmp_path, series, cli):
    """The reference log-probs are computed in shares and exchanged, pairs are split over the ranks, and the loss is
    the mean over all pairs of the step: two ranks (`python -m hpc_rlhf.train`) train exactly like one."""
    overrides = [f"--actor.pretrain={models['tiny']}", f"--data.dataset={data_dir / 'pairs_train.jsonl'}",
                 "--train.max_iterations=3", "--eval.data=", "--train.micro_train_batch_size=4",
                 "--train.train_batch_size=16", "--ckpt.save_hf_model=false"]
    train(make_config("dpo", *overrides, run_dir=tmp_path / "one"))
    cli(Path(__file__).resolve().parents[2] / "configs" / "dpo_tiny.yaml", tmp_path / "two", 2, *overrides)
    for name in ("train/loss", "train/accuracy", "train/reward_margin"):
        one, two = ([v for _, v in series(tmp_path / run, name)] for run in ("one", "two"))
        assert len(one) == 3 and two == pytest.approx(one, rel=1e-4, abs=1e-6), name


# ----- KTO --------------------------------------------------------------------------------------------------------
def test_kto_first_step_and_held_out_preferences(make_config, train, series, rows, data_dir, models, measure):
    cfg = make_config("kto", train__max_iterations=60, train__max_epochs=2, eval__steps=20, eval__max_samples=64)
    train(cfg)
    losses = [v for _, v in series(cfg.train.run_dir, "train/loss")]
    assert losses[0] == pytest.approx(0.5, rel=1e-5)  # l = 0 and z0 = 0: 1 - sigmoid(0) for every sample
    assert mean(losses[-10:]) < mean(losses[:10]) - 0.004  # a bounded loss that moves slowly at beta = 0.1
    margins = [v for _, v in series(cfg.train.run_dir, "eval/reward_margin")]
    assert len(margins) == 3 and margins[-1] > 0  # desirable answers gained on undesirable ones (noisy at 64 rows)
    pairs = rows(data_dir / "pairs_test.jsonl")[:120]
    initial = measure.preference_accuracy(models["tiny"], pairs)
    trained = measure.preference_accuracy(Path(cfg.train.run_dir) / "hf" / "actor", pairs)
    assert trained > initial + 0.05, (initial, trained)
