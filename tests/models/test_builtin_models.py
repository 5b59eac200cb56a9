"""The built-in gpt and resnet models, as plain torch modules (no MPI)."""

import pytest
import torch
import torch.nn.functional as F

from mpitrain.errors import UserError
from mpitrain.models.gpt import gpt
from mpitrain.models.resnet import resnet


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied Parameter counts once


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = gpt((12,), vocab_size=11, n_layer=2, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 11, (2, 12), dtype=torch.int32)
    with torch.no_grad():
        base = model(idx)
        assert base.shape == (2, 12, 11)
        for t in (0, 5, 10):
            later = idx.clone()
            later[:, t + 1:] = (later[:, t + 1:] + 1) % 11
            torch.testing.assert_close(model(later)[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
            now = idx.clone()
            now[:, t] = (now[:, t] + 1) % 11
            assert not torch.allclose(model(now)[:, t], base[:, t])


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_tied_head_and_parameter_count(bias):
    v, b, c, layers = 13, 8, 16, 3
    model = gpt((b,), vocab_size=v, n_layer=layers, n_head=4, n_embd=c, bias=bias)
    assert model.lm_head.weight is model.wte.weight
    # per block: qkv 3C^2, attn proj C^2, MLP 8C^2, two LayerNorm weights 2C
    # (+ with bias: LayerNorm biases 2C, qkv 3C, attn proj C, MLP 4C + C)
    block = 12 * c * c + 2 * c + (11 * c if bias else 0)
    expected = v * c + b * c + layers * block + (2 * c if bias else c)
    assert n_params(model) == expected


def test_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    pattern = torch.tensor([3, 1, 4, 1, 5])  # '1' is followed by 4 or 5: needs context
    stream = pattern.repeat(20)
    model = gpt((16,), vocab_size=7, n_layer=2, n_head=2, n_embd=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        starts = torch.randint(0, len(stream) - 17, (16,))
        x = torch.stack([stream[s:s + 16] for s in starts])
        y = torch.stack([stream[s + 1:s + 17] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("kwargs, key", [
    ({"block_size": 8}, "model.args.block_size"),
    ({"n_embd": 30, "n_head": 4}, "model.args.n_embd"),
    ({"n_layer": 0}, "model.args.n_layer"),
    ({"dropout": 1.0}, "model.args.dropout"),
])
def test_gpt_bad_args(kwargs, key):
    with pytest.raises(UserError, match=key) as e:
        gpt((16,), vocab_size=7, **kwargs)
    assert "\n" not in str(e.value)


def test_resnet20_parameter_count():
    # stem 3*16*9 + BN 2*16; per block 2 convs 9*c_in*c_out + 2 BNs; option-B projections
    # 1x1 16->32 and 32->64 with their BNs; head 64*10 + 10
    def conv(i, o, k=3):  # a bias-free k x k conv and its BatchNorm
        return k * k * i * o + 2 * o

    stage1 = 3 * (2 * conv(16, 16))
    stage2 = conv(16, 32) + conv(32, 32) + conv(16, 32, 1) + 2 * (2 * conv(32, 32))
    stage3 = conv(32, 64) + conv(64, 64) + conv(32, 64, 1) + 2 * (2 * conv(64, 64))
    expected = conv(3, 16) + stage1 + stage2 + stage3 + 64 * 10 + 10
    assert expected == 272_474
    assert n_params(resnet((3, 32, 32), 10)) == expected


@pytest.mark.parametrize("shape", [(28, 28), (3, 32, 32)])
def test_resnet_output_shape(shape):
    model = resnet(shape, 10, depth=8, widths=(4, 8, 8, 16))
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("kwargs, key", [
    ({"depth": 18}, "model.args.depth"),
    ({"widths": ()}, "model.args.widths"),
    ({"widths": (16, 0)}, "model.args.widths"),
])
def test_resnet_bad_args(kwargs, key):
    with pytest.raises(UserError, match=key) as e:
        resnet((3, 32, 32), 10, **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="image inputs"):
        resnet((784,), 10)


def test_resnet_learns_the_sign_of_the_mean():
    torch.manual_seed(0)

    def batch(n):
        x = torch.rand(n, 1, 1, 1) * 2 - 1 + 0.5 * torch.randn(n, 3, 8, 8)
        return x, (x.mean(dim=(1, 2, 3)) > 0).long()

    model = resnet((3, 8, 8), 2, depth=8, widths=(8, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        x, y = batch(64)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(512)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9
