"""Which torch dtype a model runs in: `auto` is bf16 where the device computes it natively, fp32 elsewhere.

Native bf16: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX (torch reports both); on
other CPUs bf16 is emulated and slower than fp32 (measured on an AVX512-BF16 CPU: bf16 2.8x fp32).
An explicit `bfloat16` on such a CPU is honoured (it halves memory) with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceCaps:
    """What the machine's devices compute natively in bf16."""

    cuda_bf16: bool
    cpu_bf16: bool


def device_caps() -> DeviceCaps:
    import torch

    cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return DeviceCaps(cuda_bf16=cuda, cpu_bf16=cpu)


def native_bf16(device: str, caps: DeviceCaps) -> bool:
    return caps.cuda_bf16 if device.startswith("cuda") else caps.cpu_bf16


def resolve_dtype(requested: str, device: str, caps: DeviceCaps) -> str:
    """The dtype to load the model in: `auto` -> bfloat16 where native on `device`, else float32."""
    if requested == "auto":
        return "bfloat16" if native_bf16(device, caps) else "float32"
    if requested == "bfloat16" and not native_bf16(device, caps):
        warnings.warn(f"dtype bfloat16 on {device}: this device has no native bf16, it is emulated and slower "
                      "than float32 (dtype: auto picks float32 here)", stacklevel=2)
    return requested
