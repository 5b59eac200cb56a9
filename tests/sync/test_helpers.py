"""What strategies share: flat parameter views, the period counter, checkpoint arrays."""

import numpy as np
import pytest
import torch

from mpitrain.errors import UserError
from mpitrain.sync.helpers import Every, FlatParams, load_arrays, to_arrays


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_flat_params_are_views():
    model = _model()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat = FlatParams(model)
    assert torch.equal(flat.data, before) and flat.grad.shape == before.shape
    flat.data.add_(1.0)  # one write reaches every parameter
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), before + 1)
    model(torch.ones(5, 3)).sum().backward()  # gradients land in the flat buffer
    assert flat.grad.abs().sum() > 0
    assert torch.equal(flat.grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


def test_gather_grads_survives_replaced_and_missing_grads():
    model = _model()
    flat = FlatParams(model)
    model(torch.ones(5, 3)).sum().backward()
    expect = flat.grad.clone()
    model.zero_grad(set_to_none=True)  # .grad replaced by None ...
    model(torch.ones(5, 3)).sum().backward()  # ... then by new tensors
    assert torch.equal(flat.gather_grads(), expect)
    assert all(p.grad.data_ptr() >= flat.grad.data_ptr() for p in model.parameters())
    flat.detach_grads()
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(flat.gather_grads(), torch.zeros_like(expect))  # no gradient: zero
    flat.attach_grads()
    model.zero_grad(set_to_none=False)
    model(torch.ones(5, 3)).sum().backward()
    assert torch.equal(flat.grad, expect)


def test_flat_params_need_one_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    with pytest.raises(UserError, match="one dtype on one device"):
        FlatParams(model)


def test_every():
    ran = []
    e = Every(3, lambda: ran.append(e.count))
    for step in range(1, 8):
        e.tick()
        assert len(ran) == step // 3, step  # every 3rd step
    e.flush()  # one step counted since the action last ran: run it now
    assert len(ran) == 3
    e.flush()  # nothing counted since: nothing to do
    assert len(ran) == 3
    e.tick()
    e.tick()
    e.tick()  # the count restarted at the flush
    assert len(ran) == 4
    ones = []
    every_step = Every(1, lambda: ones.append(1))
    for _ in range(3):
        every_step.tick()
    assert ones == [1, 1, 1]


def test_arrays_round_trip():
    a, b = torch.arange(4.0), torch.ones(2, 3)
    arrays = to_arrays(a=a, b=b)
    assert set(arrays) == {"a", "b"} and isinstance(arrays["a"], np.ndarray)
    a.zero_()
    assert arrays["a"].tolist() == [0.0, 1.0, 2.0, 3.0]  # a copy, not a view
    c, d = torch.zeros(4), torch.full((2, 3), 7.0)
    load_arrays(arrays | {"b": np.zeros(6)}, a=c, d=d)  # missing names are kept
    assert c.tolist() == [0.0, 1.0, 2.0, 3.0] and torch.all(d == 7.0)
