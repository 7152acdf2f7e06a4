"""Model-FLOPs utilisation (MFU): achieved training FLOP/s over the hardware's peak.

On a GPU the peak is the datasheet dense bf16/fp16 figure of a known part; on CPU there is no datasheet figure
we can trust for the actual core count, so the peak is measured once per worker with a large fp32 matmul
(what the model's matmuls could reach at best on those threads). MFU is therefore an estimate.
"""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core TFLOP/s per GPU (datasheets, no sparsity).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                   "V100": 125.0, "T4": 65.0}


def gpu_peak_flops(device_name: str) -> float | None:
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in device_name.upper():
            return tflops * 1e12
    return None


def measured_cpu_peak_flops(size: int = 512, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process's torch threads (a few milliseconds)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm up the BLAS
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> float | None:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return measured_cpu_peak_flops()


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float | None) -> float | None:
    if not peak_flops_total or flops_per_token <= 0:
        return None
    return flops_per_token * tokens_per_s / peak_flops_total
