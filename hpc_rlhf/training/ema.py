"""An exponential moving average (EMA) of a trained model's weights, as OpenRLHF's `--enable_ema` / `--ema_beta` keep.

After every optimizer step each trainable parameter's average moves towards it: ema = beta * ema + (1 - beta) * param,
starting from the weights the model was built with. The average lives in fp32 host memory on data-parallel rank 0 of
the model's group (the rank that writes its Hugging Face checkpoints); under ZeRO-3 every rank of the group takes part
in gathering each parameter, one at a time, and only rank 0 keeps it. `state_dict` / `load_state_dict` carry it
through checkpoints, so a resumed run continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hpc_rlhf.distributed.weights import full_named_parameters


def ema_update(ema: torch.Tensor, param: torch.Tensor, beta: float) -> torch.Tensor:
    """One EMA step, beta * ema + (1 - beta) * param, in the dtype of `ema` (a new tensor)."""
    return beta * ema + (1.0 - beta) * param.to(ema.dtype)


def trainable_names(model: nn.Module) -> set[str]:
    """Names (as `named_parameters` gives them, tied ones once) of the parameters the optimizer updates."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


class EmaWeights:
    """The EMA of a model's trainable parameters, held on the group's writer rank (`is_writer`); all ranks of the
    group call `update` and `init` together (they gather ZeRO-3 partitions)."""

    def __init__(self, beta: float, *, is_writer: bool) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ema_beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.is_writer = is_writer
        self.weights: dict[str, torch.Tensor] = {}

    def _full(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
        names = trainable_names(model)
        for name, full in full_named_parameters(model, copy_gathered=False, merge_lora=False):
            if name in names:
                yield name, full

    def init(self, model: nn.Module) -> None:
        """Start the average at the model's current weights."""
        for name, full in self._full(model):
            if self.is_writer:
                self.weights[name] = full.detach().to("cpu", torch.float32, copy=True)

    def update(self, model: nn.Module) -> None:
        """Move the average one step towards the model's current weights (after an optimizer step)."""
        for name, full in self._full(model):
            if self.is_writer:
                self.weights[name] = ema_update(self.weights[name], full.detach().to("cpu"), self.beta)

    def full_state_dict(self, model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`model_state` (the model's full state dict) with the averaged weights in place of the trained ones, each in
        the dtype of the entry it replaces; tied names share their first name's average."""
        averaged = {id(model_state[name]): self.weights[name].to(model_state[name].dtype)
                    for name in self.weights if name in model_state}
        return {name: averaged.get(id(value), value) for name, value in model_state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.is_writer:
            self.weights = {name: tensor.to("cpu", torch.float32) for name, tensor in state.items()}
