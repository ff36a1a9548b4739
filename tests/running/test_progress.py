"""running.progress: the bar counts the model's forward calls, through wrappers, and leaves no hook behind."""
import pytest
import torch
from torch import nn

from scoresde.core.sde import VP
from scoresde.running.progress import counting_calls
from scoresde.sampling import sample


class Score(nn.Module):
    def forward(self, x, t):
        return -x


def test_bar_counts_every_forward_call_of_a_sampler_through_a_wrapper_and_changes_no_output():
    model = Score()
    draw = lambda: sample(VP(), lambda x, t: 2.0 * model(x, t), (4, 2), method="euler", nfe=12,
                          generator=torch.Generator().manual_seed(0))
    plain = draw()
    with counting_calls(model, "sampling", total=12) as bar:
        bar.mininterval = bar.miniters = 0  # refresh on every call: tqdm.update then returns True
        counted = draw()
        assert bar.n == 12 and bar.total == 12
    assert torch.equal(counted, plain)
    assert not model._forward_hooks


def test_hook_is_removed_after_an_error_and_disabled_bar_is_none():
    model = Score()
    with pytest.raises(ZeroDivisionError):
        with counting_calls(model, "x"):
            1 / 0
    assert not model._forward_hooks
    with counting_calls(model, "x", enable=False) as bar:
        assert bar is None and not model._forward_hooks
    with counting_calls(lambda x, t: x, "plain function") as bar:
        assert bar is None
