"""Measured ceilings of one device: memory copy bandwidth, bf16 matmul FLOP/s and host-to-device copy bandwidth.

Datasheet peaks are rarely reached; the benchmarks divide their throughput by what this device actually does on the
simplest kernels. On CUDA the sizes are large (a 1 GiB device copy, an 8192^3 bf16 matmul, a 256 MiB pinned host copy)
and each repeat is timed with CUDA events after warm-ups; the whole measurement takes a few seconds on an H100. On the
CPU the same code runs with small sizes, timed with `time.perf_counter`, so that it can be tested anywhere.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

import torch

CUDA_SIZES = {"copy_bytes": 1 << 30, "matmul_size": 8192, "host_to_device_bytes": 256 << 20}
CPU_SIZES = {"copy_bytes": 16 << 20, "matmul_size": 256, "host_to_device_bytes": 16 << 20}


@dataclass(frozen=True)
class Ceilings:
    """What one device did at its best on plain kernels, with the sizes and repeat count that produced the numbers."""

    device: str
    device_name: str
    copy_bytes_per_s: float  # device-to-device copy, bytes read + bytes written per second
    bf16_matmul_flops_per_s: float
    host_to_device_bytes_per_s: float
    copy_bytes: int  # size of the copied buffer (each repeat reads and writes it once)
    matmul_size: int  # n of the n x n x n matmul
    host_to_device_bytes: int
    host_pinned: bool  # the host buffer was page-locked (CUDA only)
    repeats: int  # timed repeats per measurement; each number is their median


def _median_seconds(op: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of `op` over `repeats` runs after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        op()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            op()
            end.record()
        torch.cuda.synchronize(device)
        seconds = statistics.median(start.elapsed_time(end) / 1000.0 for start, end in events)
    else:
        times = []
        for _ in range(repeats):
            begin = perf_counter()
            op()
            times.append(perf_counter() - begin)
        seconds = statistics.median(times)
    if seconds <= 0:
        raise ValueError(f"a measurement took {seconds} s on {device}: the size is too small to time")
    return seconds


def _time_device_copy(device: torch.device, num_bytes: int, repeats: int, warmup: int) -> float:
    """Median seconds of copying a `num_bytes` buffer to another buffer on the same device."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    target = torch.empty_like(source)
    return _median_seconds(lambda: target.copy_(source), device, repeats, warmup)


def _time_bf16_matmul(device: torch.device, n: int, repeats: int, warmup: int) -> float:
    """Median seconds of an n x n by n x n bf16 matmul on seeded random data (2 n^3 FLOPs)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=generator, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return _median_seconds(lambda: torch.matmul(a, b, out=c), device, repeats, warmup)


def _time_host_to_device(device: torch.device, num_bytes: int, pinned: bool, repeats: int, warmup: int) -> float:
    """Median seconds of copying `num_bytes` from host memory (page-locked when `pinned`) to `device`."""
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pinned).random_(0, 256)
    on_device = torch.empty_like(host, device=device)
    return _median_seconds(lambda: on_device.copy_(host, non_blocking=pinned), device, repeats, warmup)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def measure_ceilings(device: str | torch.device, *, copy_bytes: int | None = None,
                     matmul_size: int | None = None, host_to_device_bytes: int | None = None,
                     repeats: int = 20, warmup: int = 3) -> Ceilings:
    """Measure the copy, bf16 matmul and host-to-device ceilings of `device` ("cuda", "cuda:1" or "cpu").

    Sizes default to CUDA_SIZES on a GPU and CPU_SIZES otherwise; pass them to override.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        defaults = CUDA_SIZES
    elif device.type == "cpu":
        defaults = CPU_SIZES
    else:
        raise ValueError(f"device must be cuda or cpu, got {device}")
    copy_bytes = defaults["copy_bytes"] if copy_bytes is None else copy_bytes
    matmul_size = defaults["matmul_size"] if matmul_size is None else matmul_size
    host_to_device_bytes = defaults["host_to_device_bytes"] if host_to_device_bytes is None else host_to_device_bytes
    for name, value in (("copy_bytes", copy_bytes), ("matmul_size", matmul_size),
                        ("host_to_device_bytes", host_to_device_bytes), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")

    pinned = device.type == "cuda"
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        copy_s = _time_device_copy(device, copy_bytes, repeats, warmup)
        matmul_s = _time_bf16_matmul(device, matmul_size, repeats, warmup)
        host_s = _time_host_to_device(device, host_to_device_bytes, pinned, repeats, warmup)

    return Ceilings(
        device=str(device),
        device_name=_device_name(device),
        copy_bytes_per_s=2 * copy_bytes / copy_s,
        bf16_matmul_flops_per_s=2 * matmul_size**3 / matmul_s,
        host_to_device_bytes_per_s=host_to_device_bytes / host_s,
        copy_bytes=copy_bytes,
        matmul_size=matmul_size,
        host_to_device_bytes=host_to_device_bytes,
        host_pinned=pinned,
        repeats=repeats,
    )

