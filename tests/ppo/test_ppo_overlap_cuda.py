"""The generation thread of colocated async on a GPU (skipped without CUDA): its kernels go to its own stream, which
first waits for the trainers' stream (the weight copies queued before it started), and the trainers' stream waits
for it at join (before the next weight copy overwrites what it read). `tools/gpu_smollm2_suite.sh decode` runs it."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.trainers.ppo.overlap import BackgroundGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)
BUSY_CYCLES = 200_000_000  # ~0.1 s of one spinning kernel: a read that did not wait would see the old values


def test_generation_waits_for_the_weights_queued_before_it_and_runs_on_its_own_stream():
    weights = torch.zeros(1 << 20, device=CUDA)
    background = BackgroundGeneration(CUDA)
    seen = {}

    def generate() -> dict[str, float]:
        seen["stream"] = torch.cuda.current_stream(CUDA)
        return {"weights_sum": float(weights.sum().item())}  # .item() waits for this stream only

    torch.cuda._sleep(BUSY_CYCLES)  # the trainers' stream is busy ...
    weights.fill_(1.0)  # ... and the "weight sync" is queued behind it
    background.start(generate)
    assert background.join() == {"weights_sum": float(weights.numel())}
    assert seen["stream"] == background.stream != torch.cuda.current_stream(CUDA)


def test_the_next_weight_copy_waits_for_the_generation_reading_the_weights():
    weights = torch.ones(1 << 20, device=CUDA)
    background = BackgroundGeneration(CUDA)
    read = {}

    def generate() -> dict[str, float]:
        torch.cuda._sleep(BUSY_CYCLES)  # generation still busy on its stream ...
        read["sum"] = weights.sum()  # ... then reads the weights, queued without waiting on the host
        return {}

    background.start(generate)
    background.join()
    weights.fill_(5.0)  # the next sync, on the trainers' stream
    assert float(read["sum"].item()) == float(weights.numel())  # it read the old weights, not the new ones
