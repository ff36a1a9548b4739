"""Random streams across devices: one CPU seed drives the draws made on an accelerator."""
from __future__ import annotations

import torch

__all__ = ["device_generator"]


def device_generator(generator: torch.Generator | None, device: torch.device | str | None) -> torch.Generator | None:
    """A generator on `device` seeded by one draw of the CPU `generator` (itself where `device` is the CPU or None):
    one seed drives both, and the CPU path stays what it was."""
    if device is None or torch.device(device).type == "cpu":
        return generator
    return torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
