"""The precision rule: bf16 autocast wherever the hardware runs bf16 natively, fp32 elsewhere.

One function decides it for training, evaluation, calibration, soups and the benchmarks, so a
model is scored in the precision it was trained in on the same machine.
"""

from __future__ import annotations

import torch


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matrix work in hardware (AVX512-BF16 or AMX), as PyTorch detects it."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def bf16_native(device: str | torch.device) -> bool:
    """Whether `device` (a CUDA GPU or the CPU) runs bf16 natively."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_native()


def use_bf16(device: str | torch.device, requested: bool | None = None) -> bool:
    """The precision rule: `requested` when given (True or False), else bf16 where `device` runs it natively."""
    return bf16_native(device) if requested is None else bool(requested)


def device_name(use_cpu: bool = False) -> str:
    """The device work runs on, in words (GPU name, or CPU with its thread count)."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def name(bf16: bool, fp16: bool = False) -> str:
    """A precision in words: bf16, fp16 or fp32."""
    return "bf16" if bf16 else ("fp16" if fp16 else "fp32")
