"""The precision rule: bf16 autocast wherever the hardware runs bf16 natively, fp32 elsewhere.

One function decides it for training, evaluation, calibration, soups and the benchmarks, so a
model is scored in the precision it was trained in on the same machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

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


def cpu_name(cpuinfo: str | None = None) -> str:
    """This CPU in words: its model name, family and model from /proc/cpuinfo (else the platform's name).

    Family and model because a virtual machine may show only "AMD EPYC": two EPYC generations then look
    alike but serve at very different speeds (docs/benchmarks.md).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = " ".join(fields.get("model name", "").split()) or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        return f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name


def device_name(use_cpu: bool = False) -> str:
    """The device work runs on, in words (GPU name, or CPU with its model and thread count)."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_name()}; {torch.get_num_threads()} threads)"


def name(bf16: bool, fp16: bool = False) -> str:
    """A precision in words: bf16, fp16 or fp32."""
    return "bf16" if bf16 else ("fp16" if fp16 else "fp32")
