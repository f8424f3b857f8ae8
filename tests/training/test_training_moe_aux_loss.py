"""The MoE load-balancing loss (actor.aux_loss_coef): the actor's gradient is that of the task loss plus coef x the
router loss, which is computed over the real tokens only (padded and packed micro-batches agree), and equals both
transformers' `load_balancing_loss_func` and the Switch Transformer formula written out here."""

from __future__ import annotations


import pytest
import torch

from hpc_rlhf.builtin_models.tiny import build_tiny_moe_model
from tests.multiproc import run_ranks
from tests.training.one_rank_actor import nll_backward

COEF = 0.5
# Two samples of different lengths: padded, the second row carries padding the router loss must leave out.
SAMPLES = (([1, 40, 41, 42, 43], [50, 51, 52, 2]), ([1, 60, 61], [70, 2]))
CASES = ((0.0, False), (COEF, False), (COEF, True))  # (aux_loss_coef, packing)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_moe_model(tmp_path_factory.mktemp("tiny_moe") / "model", seed=0)


def actor_gradients(model_dir: str) -> list[dict]:
    """One `Actor.backward` of the token-mean NLL per case, on a one-rank ZeRO-0 engine: its metrics and gradients."""
    # micro-batch size 2 holds both samples: padded, the second row carries padding the router loss must leave out
    return [nll_backward(model_dir, SAMPLES, micro_batch_size=2, packing=packing, aux_loss_coef=coef)
            for coef, packing in CASES]


def switch_load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer eq. 4-6 over all layers' tokens: E x sum_e (share of top-k picks of e) x (mean prob of e)."""
    probs = torch.cat([torch.softmax(logits, dim=-1) for logits in router_logits])  # [layers x tokens, E]
    picks = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
    return num_experts * (picks.mean(0) * probs.mean(0)).sum()


def by_hand(model_dir, coef: float) -> tuple[float, float, dict[str, torch.Tensor]]:
    """NLL, router loss and the gradient of NLL + coef x router loss, each sample run alone (no padding exists)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    config = model.config
    token_log_probs, layers = [], [[] for _ in range(config.num_hidden_layers)]
    for prompt, response in SAMPLES:
        ids = torch.tensor([prompt + response])
        out = model(input_ids=ids, output_router_logits=True)
        log_probs = torch.log_softmax(out.logits[0, len(prompt) - 1:-1], dim=-1)
        token_log_probs.append(log_probs[torch.arange(len(response)), torch.tensor(response)])
        for layer, logits in zip(layers, out.router_logits):
            layer.append(logits)
    nll = -torch.cat(token_log_probs).mean()
    router_logits = tuple(torch.cat(layer) for layer in layers)  # [real tokens, E] per layer
    aux = load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok, None)
    switch = switch_load_balancing_loss(list(router_logits), config.num_experts, config.num_experts_per_tok)
    assert float(aux.detach()) == pytest.approx(float(switch), rel=1e-6)
    (nll + coef * aux).backward()
    return float(nll), float(aux), {name: p.grad for name, p in model.named_parameters()}


def test_aux_loss_adds_coef_times_the_router_loss_of_the_real_tokens(moe_dir):
    results = run_ranks(actor_gradients, 1, str(moe_dir), timeout_s=180)[0]
    for (coef, packing), result in zip(CASES, results):
        nll, aux, grads = by_hand(moe_dir, coef)
        metrics = result["metrics"]
        assert metrics["loss"] == pytest.approx(nll, rel=1e-5)  # "loss" stays the task loss
        if coef == 0:
            assert "aux_loss" not in metrics  # off: the model is not asked for router logits
        else:
            assert aux > 2.0  # top-2 of 4 experts: 2.0 is a perfectly even router, this one is not
            assert metrics["aux_loss"] == pytest.approx(aux, rel=1e-5), packing
        for name, expected in grads.items():
            got = result["grads"][name]
            scale = max(float(expected.abs().max()), 1e-6)
            assert float((got - expected).abs().max()) <= 1e-4 * scale + 1e-7, (coef, packing, name)
    # The router gradient really carries the aux term: with and without the coefficient it differs.
    router = "model.layers.1.mlp.gate.weight"
    assert not torch.allclose(results[0]["grads"][router], results[1]["grads"][router], rtol=1e-3, atol=0)
