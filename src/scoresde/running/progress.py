"""Progress of long sampling and likelihood runs: a tqdm bar that counts a network's forward calls.

Samplers and ODE solvers call the model many times (1000-step ancestral chains, adaptive likelihood
integrals); `counting_calls` shows them as training shows its steps, without the samplers knowing: a
forward hook on the module advances the bar, so any score wrapper around it (guidance, inpainting,
preconditioning) is counted too.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from tqdm.auto import tqdm

__all__ = ["counting_calls"]


@contextmanager
def counting_calls(model: object, desc: str, total: int | None = None, enable: bool = True) -> Iterator[tqdm | None]:
    """Within the block, each forward call of `model` (an nn.Module; anything else is not counted) advances a
    tqdm bar on stderr with `total` calls expected (None: unknown, as for adaptive solvers); yields the bar (None
    when disabled). The hook is removed on exit, also on an exception."""
    if not enable or not isinstance(model, nn.Module):
        yield None
        return
    with tqdm(total=total, desc=desc, unit="call", mininterval=2, dynamic_ncols=True, leave=False) as bar:
        def hook(*_) -> None:  # returns None: a forward hook's return value would replace the output
            bar.update()

        handle = model.register_forward_hook(hook)
        try:
            yield bar
        finally:
            handle.remove()
