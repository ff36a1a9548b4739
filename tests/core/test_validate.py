"""core.validate: each helper accepts what it documents, refuses the rest with a message naming the parameter."""
import math

import numpy as np
import pytest
import torch

from scoresde.core.validate import batch_tensor, integer, moments, number, one_of, positive


def test_integer():
    assert integer("n", 3, 1) == 3 and integer("n", 0, 0) == 0
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
            integer("n", bad, 1)


def test_number_and_positive():
    assert number("x", 3) == 3.0 and isinstance(number("x", 3), float)
    assert number("b", 0.0, 0, strict=False) == 0.0 and positive("s", 1e-300) == 1e-300
    for bad in (math.nan, math.inf, "1", None, True):
        with pytest.raises(ValueError, match=r"x must be a finite number, got"):
            number("x", bad)
    with pytest.raises(ValueError, match=r"b must be a finite number >= 0, got -1"):
        number("b", -1.0, 0, strict=False)
    for bad in (0.0, -2, math.inf):
        with pytest.raises(ValueError, match=r"s must be a finite number > 0, got"):
            positive("s", bad)


def test_one_of():
    assert one_of("mode", "cd", ("cd", "ct")) == "cd"
    with pytest.raises(ValueError, match=r"mode must be one of 'cd', 'ct', got 'xx'"):
        one_of("mode", "xx", ("cd", "ct"))


def test_batch_tensor():
    x = torch.zeros(3, 2)
    assert batch_tensor("x", x) is x
    for bad in (torch.zeros(3), torch.zeros(3, 2, dtype=torch.long), np.zeros((3, 2)), [[0.0]]):
        with pytest.raises(ValueError, match=r"x must be a floating tensor of shape \(batch, \.\.\.\)"):
            batch_tensor("x", bad)
    with pytest.raises(ValueError, match="x must be non-empty"):
        batch_tensor("x", torch.zeros(0, 2))
    nan = torch.full((2, 2), math.nan)
    with pytest.raises(ValueError, match="x must be finite"):
        batch_tensor("x", nan)
    assert batch_tensor("x", nan, finite=False) is nan


def test_moments():
    C = np.array([[2.0, 0.5], [0.5 + 1e-14, 1.0]])
    m, S = moments("law", torch.tensor([1.0, 2.0]), C)
    assert m.dtype == np.float64 and np.array_equal(S, S.T) and np.allclose(S, C)
    with pytest.raises(ValueError, match=r"law: mean must have shape \(d,\) and covariance \(d, d\)"):
        moments("law", [0.0, 0.0], np.eye(3))
    with pytest.raises(ValueError, match="law: the dimension must be 3, got 2"):
        moments("law", [0.0, 0.0], np.eye(2), dim=3)
    with pytest.raises(ValueError, match="law: mean and covariance must be finite"):
        moments("law", [0.0, math.nan], np.eye(2))
    with pytest.raises(ValueError, match="law: covariance must be symmetric"):
        moments("law", [0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
