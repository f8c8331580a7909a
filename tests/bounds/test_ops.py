"""The operator table (litplug.bounds.ops): an operator is one table entry."""

import pytest
import torch
from torch import nn

from litplug.bounds import (
    BoundedNetwork,
    UnsupportedOperationError,
)


def test_an_operator_is_one_table_entry(monkeypatch):
    # ELU has no entry: refused at construction, naming the module; one monotone entry makes it
    # boundable, and its bounds contain the outputs of sampled inputs.
    from litplug.bounds import OPERATORS, Op
    from litplug.bounds.ops import monotone_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ELU(), nn.Linear(6, 3))
    with pytest.raises(UnsupportedOperationError, match=r"ELU at module '1'"):
        BoundedNetwork(net)
    monkeypatch.setitem(OPERATORS, nn.ELU, Op(monotone_module))
    x = torch.rand(8, 4)
    with torch.no_grad():
        lower, upper = BoundedNetwork(net)(x - 0.1, x + 0.1)[:2]
        for _ in range(50):
            out = net(x + (torch.rand_like(x) * 2 - 1) * 0.1)
            assert (lower <= out + 1e-6).all() and (out <= upper + 1e-6).all()
