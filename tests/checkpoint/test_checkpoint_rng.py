"""Generator states and plain torch training state come back exactly after a checkpoint round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from hpc_rlhf.run.checkpoint import (
    ModelAndOptimizer,
    capture_rng_state,
    config_fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

FINGERPRINT = config_fingerprint({"train": {"seed": 1}})


def _draws() -> dict:
    return {"python": [random.random() for _ in range(5)], "gauss": random.gauss(0.0, 1.0),
            "numpy": np.random.rand(5).tolist(), "numpy_normal": np.random.randn(3).tolist(),
            "torch": torch.rand(5), "torch_normal": torch.randn(3)}


def _save(root: Path, engines: dict, iteration: int = 1) -> Path:
    return save_checkpoint(root, iteration, rank=0, world_size=1, barrier=lambda: None, engines=engines,
                           trainer_state={"next_iteration": iteration}, config_fingerprint=FINGERPRINT, keep_last=1)


def test_draws_after_restore_equal_draws_after_save(tmp_path: Path, same) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.randn()  # leaves a cached Gaussian in numpy's state, which must come back too
    random.gauss(0.0, 1.0)  # and one in python's
    path = _save(tmp_path, {})
    after_save = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_checkpoint(path, rank=0, engines={}, config_fingerprint=FINGERPRINT)
    same(after_save, _draws())


def test_restore_rng_false_leaves_generators_alone(tmp_path: Path, same) -> None:
    torch.manual_seed(1)
    path = _save(tmp_path, {})
    torch.manual_seed(2)
    expected = torch.rand(4)
    torch.manual_seed(2)
    load_checkpoint(path, rank=0, engines={}, config_fingerprint=FINGERPRINT, restore_rng=False)
    same(expected, torch.rand(4))


def test_capture_and_restore_without_files(same) -> None:
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    same(first, _draws())


def _training(seed: int) -> ModelAndOptimizer:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return ModelAndOptimizer(model, optimizer, scheduler)


def _train(state: ModelAndOptimizer, steps: int) -> list[float]:
    """Batches and dropout masks come from the global torch generator."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 6)
        loss = (state.model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.lr_scheduler.step()
        losses.append(loss.item())
    return losses


def test_model_and_optimizer_resume_bit_for_bit(tmp_path: Path, same) -> None:
    uninterrupted = _training(seed=0)
    _train(uninterrupted, 3)
    path = _save(tmp_path, {"policy": uninterrupted}, iteration=3)
    losses_a = _train(uninterrupted, 3)

    resumed = _training(seed=123)  # other initial weights, other generator state
    load_checkpoint(path, rank=0, engines={"policy": resumed}, config_fingerprint=FINGERPRINT)
    losses_b = _train(resumed, 3)

    assert losses_a == losses_b
    same(uninterrupted.model.state_dict(), resumed.model.state_dict(), "model")
    same(uninterrupted.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    same(uninterrupted.lr_scheduler.state_dict(), resumed.lr_scheduler.state_dict(), "scheduler")
    assert resumed.optimizer.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3


def test_missing_optimizer_on_either_side_is_an_error(tmp_path: Path) -> None:
    path = _save(tmp_path, {"policy": _training(seed=0)})
    bare = ModelAndOptimizer(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                                 torch.nn.Linear(8, 1)))
    try:
        load_checkpoint(path, rank=0, engines={"policy": bare}, config_fingerprint=FINGERPRINT)
    except ValueError as err:
        assert "engine 'policy'" in str(err) and "optimizer" in str(err)
    else:
        raise AssertionError("loading optimizer state into an object without an optimizer must fail")
