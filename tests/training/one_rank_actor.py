"""One `Actor.backward` of the token-mean NLL on a one-rank ZeRO-0 engine (run it inside `tests.multiproc.run_ranks`):
the metrics and the gradients that tests compare between settings of the same step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def nll_backward(model_dir: str, samples: Sequence[tuple[list[int], list[int]]], *, micro_batch_size: int,
                 packing: bool = False, attn_implementation: str = "eager", **engine_kwargs: Any) -> dict[str, Any]:
    """(prompt ids, response ids) samples in micro-batches of `micro_batch_size`; `engine_kwargs` go to EngineConfig.
    Returns {"metrics", "grads", "compiled_layers"} (the class names of the layers torch.compiled in place)."""
    from transformers import AutoModelForCausalLM

    from hpc_rlhf.algos import sft_loss
    from hpc_rlhf.training.batching import TokenSample, make_micro_batches
    from hpc_rlhf.training.deepspeed_setup import EngineConfig
    from hpc_rlhf.training.models import Actor

    tokens = [TokenSample(prompt_ids=torch.tensor(p), response_ids=torch.tensor(r)) for p, r in samples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    steps = -(-len(samples) // micro_batch_size)  # DeepSpeed wants whole micro-batches in its train_batch_size
    cfg = EngineConfig(zero_stage=0, micro_train_batch_size=micro_batch_size, train_batch_size=steps * micro_batch_size,
                       attn_implementation=attn_implementation, **engine_kwargs)
    actor = Actor(model, cfg, None, num_training_steps=1)
    batches = make_micro_batches(tokens, micro_batch_size=micro_batch_size, packing=packing, pad_token_id=0)
    metrics = actor.backward(batches, lambda batch, out: sft_loss(out.log_probs, batch.action_mask))
    module = actor.engine.module
    return {"metrics": metrics,
            "grads": {name: p.grad.detach().clone() for name, p in module.named_parameters()},
            "compiled_layers": [type(m).__name__ for m in module.modules()
                                if getattr(m, "_compiled_call_impl", None) is not None]}
