"""`TrainedModel.backward` keeps each micro-batch's metrics as tensors and reads them once: the values it returns are
the same float64 numbers that reading each one at once gave, Python floats included."""

from __future__ import annotations

import torch

from hpc_rlhf.training.models import _read_all


def test_floats_and_tensors_read_back_exactly_in_float64():
    values = [0.1, torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float32), 7]
    assert _read_all(values, torch.device("cpu")) == [0.1, 0.2, float(torch.tensor(0.3, dtype=torch.float32)), 7.0]
    assert _read_all([0.1, 2], torch.device("cpu")) == [0.1, 2.0]  # no tensor: no device round trip
