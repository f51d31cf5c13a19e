"""Where training and eval run: training.device as a torch.device, and the autocast that goes with it.

CPU is the default and its path is exactly the float32 one (no autocast, batches stay where collate
made them). On a CUDA device with bf16 support, forwards run under bf16 autocast; the losses cast the
logits (and hidden states) to float32 before any softmax or distance, so only the matmuls are bf16.
The transformers teacher resolves teacher.device here too (engine/teachers/transformers_backend.py).
"""

from __future__ import annotations

import contextlib

import torch

from engine.errors import SpecError


def resolve_device(name: str, where: str = "<spec>", field: str = "training.device") -> torch.device:
    """training.device or teacher.device (`field`: "auto", "cpu", "cuda", "cuda:N") -> a torch.device this
    machine has.

    auto: cuda if available, else cpu. A CUDA device this machine lacks is a one-line SpecError naming `field`.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", 0)
    if not torch.cuda.is_available():
        raise SpecError(f"{where}: {field}: {name} asked for, but torch sees no CUDA device on this "
                        "machine (use cpu, or auto to take CUDA only where there is one)")
    index = int(name.split(":")[1]) if ":" in name else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise SpecError(f"{where}: {field}: {name} asked for, but this machine has "
                        f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on a CUDA device that supports it; None (plain float32) everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device):
    """The forward pass's context: bf16 autocast on CUDA with bf16, else nothing at all."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device`; on the CPU the very same dict (collate builds CPU tensors)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
