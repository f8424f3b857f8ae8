"""EMA of the actor's weights (actor.enable_ema): the update rule by hand, the recursion over real optimizer steps
(exactly, in fp32), the checkpoint round trip and the Hugging Face copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_rlhf.training.ema import EmaWeights, ema_update
from tests.multiproc import run_ranks
from tests.training import ema_muon_worker


def test_ema_update_by_hand():
    # beta 0.5 from 0 over the weights 1, 2, 3: 0.5, 1.25, 2.125 (exact in binary floating point)
    ema = torch.zeros(2)
    values = []
    for weight in (1.0, 2.0, 3.0):
        ema = ema_update(ema, torch.full((2,), weight), 0.5)
        values.append(ema[0].item())
    assert values == [0.5, 1.25, 2.125]
    # beta 0.75 from 8 towards 0: 6, 4.5
    ema = ema_update(torch.tensor([8.0]), torch.tensor([0.0]), 0.75)
    assert ema.item() == 6.0
    assert ema_update(ema, torch.tensor([0.0]), 0.75).item() == 4.5


def test_ema_weights_track_trainable_parameters_only():
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    ema = EmaWeights(0.5, is_writer=True)
    ema.init(model)
    assert set(ema.state_dict()) == {"weight"}
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema.init(model)
    with torch.no_grad():
        model.weight.add_(2.0)  # [[3, 4]]: the average halfway, [[2, 3]]
    ema.update(model)
    assert ema.state_dict()["weight"].tolist() == [[2.0, 3.0]]
    full = ema.full_state_dict(model.state_dict())
    assert full["weight"].tolist() == [[2.0, 3.0]] and torch.equal(full["bias"], model.bias)
    with pytest.raises(ValueError, match="ema_beta"):
        EmaWeights(1.5, is_writer=True)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ema_follows_the_recursion_over_optimizer_steps_and_resumes(tmp_path, zero_stage):
    beta, steps = 0.9, 3
    result = run_ranks(ema_muon_worker.run_ema, 1, str(tmp_path), zero_stage, beta, steps, timeout_s=300)[0]
    history = result["history"]
    assert not torch.equal(history[0]["lm_head.weight"], history[-1]["lm_head.weight"])  # the weights moved
    expected = ema_muon_worker.hand_ema(history, beta)
    assert set(result["ema_after"]) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(result["ema_after"][name].numpy(), value, err_msg=name)
    # A resumed engine holds the same EMA and continues it identically.
    for name in expected:
        assert torch.equal(result["ema_resumed"][name], result["ema_after"][name]), name
        assert torch.equal(result["ema_next_resumed"][name], result["ema_next"][name]), name
    # The Hugging Face copy is the EMA (tied / untied as the model is).
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "actor_ema")
    for name, param in loaded.named_parameters():
        assert torch.equal(param.detach(), result["ema_next"][name]), name
