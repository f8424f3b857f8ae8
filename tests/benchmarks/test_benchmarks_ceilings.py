"""Device ceilings on the CPU: real runs return sane numbers and sizes; a fake clock checks the byte/FLOP counting."""

import math

import pytest
import torch

from hpc_rlhf.benchmarks import ceilings
from hpc_rlhf.benchmarks.ceilings import CPU_SIZES, measure_ceilings


def test_cpu_defaults_give_positive_finite_numbers_and_record_sizes():
    result = measure_ceilings("cpu", repeats=10, warmup=1)
    for value in (result.copy_bytes_per_s, result.bf16_matmul_flops_per_s, result.host_to_device_bytes_per_s):
        assert math.isfinite(value) and value > 0
    assert (result.copy_bytes, result.matmul_size, result.host_to_device_bytes) == (
        CPU_SIZES["copy_bytes"], CPU_SIZES["matmul_size"], CPU_SIZES["host_to_device_bytes"])
    assert result.repeats == 10 and result.device == "cpu" and not result.host_pinned and result.device_name


def test_rates_count_read_plus_write_and_two_n_cubed(monkeypatch):
    # A clock that advances 0.25 s per reading: every timed repeat lasts exactly 0.25 s.
    readings = iter(range(10_000))
    monkeypatch.setattr(ceilings, "perf_counter", lambda: next(readings) * 0.25)
    result = measure_ceilings(torch.device("cpu"), copy_bytes=1000, matmul_size=8, host_to_device_bytes=3000,
                              repeats=10, warmup=0)
    assert result.copy_bytes_per_s == pytest.approx(2 * 1000 / 0.25)
    assert result.bf16_matmul_flops_per_s == pytest.approx(2 * 8**3 / 0.25)
    assert result.host_to_device_bytes_per_s == pytest.approx(3000 / 0.25)
    assert (result.copy_bytes, result.matmul_size, result.host_to_device_bytes) == (1000, 8, 3000)


def test_bad_device_and_sizes_are_refused():
    with pytest.raises(ValueError, match="device"):
        measure_ceilings("meta")
    with pytest.raises(ValueError, match="matmul_size"):
        measure_ceilings("cpu", matmul_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_ceilings("cuda")
