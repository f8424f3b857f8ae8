"""RewardModel: the score is the head's logit at the last real token, whatever the padding and batch around it."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_rlhf.rewards import RewardError, RewardModel
from hpc_rlhf.rewards.reward_model import last_real_token_index, right_pad

# Token 0 is the pad id; [3, 0, 8] also uses it as a real token.
SEQUENCES = [[5, 17, 33, 2], [9, 4], [100, 101, 102, 103, 104, 105, 106], [7], [3, 0, 8]]


def manual_scores(model_dir, sequences) -> list[float]:
    """Reference: each sequence alone through the backbone and head in float64; the last position's logit."""
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float64).eval()
    scores = []
    with torch.no_grad():
        for sequence in sequences:
            hidden = model.model(input_ids=torch.tensor([sequence])).last_hidden_state
            scores.append(float(model.score(hidden)[0, -1, 0]))
    return scores


@pytest.fixture(scope="module")
def reference(tiny_reward_model_dir) -> list[float]:
    return manual_scores(tiny_reward_model_dir, SEQUENCES)


def test_scores_match_a_manual_forward_at_the_last_real_token(tiny_reward_model_dir, reference):
    model = RewardModel(tiny_reward_model_dir, micro_batch_size=8)
    scores = model.score_sequences(SEQUENCES)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), torch.tensor(reference, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert len({round(s, 4) for s in reference}) == len(reference)  # the check would notice mixed-up rows


def test_scores_do_not_depend_on_padding_or_batch_composition(tiny_reward_model_dir, reference):
    model = RewardModel(tiny_reward_model_dir, micro_batch_size=2)
    alone = torch.cat([model.score_sequences([sequence]) for sequence in SEQUENCES])
    reversed_batch = model.score_sequences(SEQUENCES[::-1]).flip(0)
    input_ids, mask = right_pad(SEQUENCES, pad_token_id=0)
    extra_padding = model.score_tokens(torch.cat([input_ids, torch.zeros(5, 9, dtype=torch.long)], dim=1),
                                       torch.cat([mask, torch.zeros(5, 9, dtype=torch.long)], dim=1))
    for scores in (alone, reversed_batch, extra_padding):
        torch.testing.assert_close(scores.double(), torch.tensor(reference, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)


def test_differs_from_pad_id_pooling_when_a_sequence_ends_in_the_pad_id(tiny_reward_model_dir, reference):
    """[3, 0, 8] ends in a real token; [3, 8, 0] ends in token 0, which HF pooling would skip but we score."""
    model = RewardModel(tiny_reward_model_dir)
    ours = model.score_sequences([[3, 8, 0]])
    expected = manual_scores(tiny_reward_model_dir, [[3, 8, 0]])
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    hf_pooled = manual_scores(tiny_reward_model_dir, [[3, 8]])
    assert abs(ours.item() - hf_pooled[0]) > 1e-3


def test_call_interface_and_normalisation_from_config(tiny_reward_model_dir, tmp_path, reference):
    import shutil

    normalised_dir = tmp_path / "normalised"
    shutil.copytree(tiny_reward_model_dir, normalised_dir)
    config_path = normalised_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(reward_mean=0.5, reward_std=2.0)
    config_path.write_text(json.dumps(config))

    model = RewardModel(normalised_dir, dtype="float32", micro_batch_size=3)
    result = model(["q"] * 5, ["p"] * 5, None, token_ids=[torch.tensor(s) for s in SEQUENCES])
    expected = (torch.tensor(reference, dtype=torch.float64) - 0.5) / 2.0
    torch.testing.assert_close(result.rewards.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.scores, result.rewards) and result.extra_logs == {}
    assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())


def test_text_queries_use_the_saved_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         num_labels=1)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model = RewardModel(tmp_path)
    queries = ["<s>1+1=2</s>", "3+4=7"]
    by_text = model(queries, ["1+1=", "3+4="], ["2", "7"])
    by_ids = model.score_sequences([tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries])
    assert torch.equal(by_text.rewards, by_ids)
    assert tokenizer("3+4=7", add_special_tokens=False)["input_ids"] != tokenizer("3+4=7")["input_ids"]


def test_no_tokenizer_needs_token_ids(tiny_reward_model_dir):
    model = RewardModel(tiny_reward_model_dir)
    with pytest.raises(RewardError, match="no tokenizer saved beside it; pass token_ids"):
        model(["a"], ["a"], ["b"])
    with pytest.raises(RewardError, match="got 1 token_ids for 2 queries"):
        model(["a", "b"], ["a", "b"], None, token_ids=[[1]])


def test_bad_masks_and_settings(tiny_reward_model_dir, tmp_path):
    with pytest.raises(RewardError, match="row 1 of attention_mask is not right-padded"):
        last_real_token_index(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    with pytest.raises(RewardError, match="row 0 of the batch has no real tokens"):
        last_real_token_index(torch.tensor([[0, 0], [1, 0]]))
    assert last_real_token_index(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])).tolist() == [1, 2, 0]
    with pytest.raises(RewardError, match=r"token_ids\[1\] is empty"):
        right_pad([[1], []], 0)
    with pytest.raises(RewardError, match="does not exist"):
        RewardModel(tmp_path / "missing")
    with pytest.raises(RewardError, match="micro_batch_size must be an integer >= 1"):
        RewardModel(tiny_reward_model_dir, micro_batch_size=0)
    with pytest.raises(RewardError, match="dtype must be one of"):
        RewardModel(tiny_reward_model_dir, dtype="float8")
