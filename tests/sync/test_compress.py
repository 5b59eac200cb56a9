"""Gradient compression: the special cases equal the exact sum, error feedback carries
exactly what was not sent, half precision is within its rounding, the bytes are counted."""

import pytest
import torch

from mpitrain.errors import UserError
from mpitrain.options import build
from mpitrain.sync import compress
from mpitrain.sync.allreduce import Options

pytestmark = pytest.mark.mpi


def opts(**kw):
    return build(Options, kw, "<test>", "sync.allreduce")


def model_and_grad(world, seed=0):
    """A small model's parameters and a flat gradient, different on every rank."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1000 * seed + world.rank)
    return params, torch.randn(sum(p.numel() for p in params), generator=g)


def exact_sum(world, grad):
    out = grad.clone()
    world.allreduce_(out)
    return out


@pytest.mark.parametrize("kind, kw", [("topk", {"topk_ratio": 1.0}),
                                      ("powersgd", {"powersgd_rank": 12, "powersgd_min_numel": 0})])
def test_special_cases_equal_the_exact_sum(world, kind, kw):
    params, grad = model_and_grad(world)
    c = compress.create(opts(compress=kind, **kw), world, params, grad)
    if kind == "powersgd":
        assert len(c.matrices) == 2  # both weight matrices compressed, at full rank
    for step in range(3):
        g = grad * (step + 1)
        want = exact_sum(world, g)
        c.reduce_(g, step)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, kw", [("topk", {"topk_ratio": 0.1}), ("sign", {}),
                                      ("powersgd", {"powersgd_rank": 1, "powersgd_min_numel": 0})])
def test_error_feedback_carries_exactly_what_was_not_sent(world, kind, kw):
    """sum over ranks of (gradient + old residual - new residual) is what arrived."""
    params, grad = model_and_grad(world, seed=1)
    c = compress.create(opts(compress=kind, **kw), world, params, grad)
    for step in range(3):
        g = grad * (1 + step)
        if kind == "powersgd":
            old = [e.clone() for e in c.error]
            acc = torch.cat([(g[o:o + r * k].view(r, k) + e).reshape(-1) for (o, r, k), e in zip(c.matrices, old)])
        else:
            acc = g + c.residual
        out = g.clone()
        c.reduce_(out, step)
        if kind == "powersgd":
            new = torch.cat([e.reshape(-1) for e in c.error])
            sent = exact_sum(world, acc - new)
            got = torch.cat([out[o:o + r * k] for o, r, k in c.matrices])
        else:
            sent = exact_sum(world, acc - c.residual)
            got = out
        torch.testing.assert_close(got, sent, rtol=1e-4, atol=1e-5)
    if kind == "topk":  # exactly k values left the rank; the rest stayed, untouched
        assert int((c.residual == 0).sum()) == c.k


@pytest.mark.parametrize("kind, rtol", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_half_precision_within_its_rounding(world, kind, rtol):
    params, grad = model_and_grad(world, seed=2)
    c = compress.create(opts(compress=kind), world, params, grad)
    for scale in (1.0, 1e-6, 1e4):  # fp16 is scaled into range: tiny and large gradients survive
        g = grad * scale
        want = exact_sum(world, g)
        c.reduce_(g, 0)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, kw", [("topk", {"topk_ratio": 0.1}), ("sign", {}),
                                      ("powersgd", {"powersgd_rank": 1, "powersgd_min_numel": 0})])
def test_state_round_trip(world, kind, kw):
    """A fresh compressor given another's state arrays continues exactly as that one does;
    arrays with other names or shapes change nothing; fp16/bf16 have no state."""
    params, grad = model_and_grad(world, seed=3)
    a = compress.create(opts(compress=kind, **kw), world, params, grad)
    for step in range(2):
        a.reduce_(grad * (step + 1), step)
    prefix = f"{kind}."
    own, shared = (compress.state_arrays(t, prefix) for t in a.state())
    assert own and all(k.startswith(prefix) for k in own) and bool(shared) == (kind == "powersgd")
    b = compress.create(opts(compress=kind, **kw), world, params, grad)
    assert compress.load_state(b.state()[0], own, prefix) and compress.load_state(b.state()[1], shared, prefix)
    for step in (2, 3):
        ga, gb = grad * (step + 1), grad * (step + 1)
        a.reduce_(ga, step)
        b.reduce_(gb, step)
        assert torch.equal(ga, gb)
    c = compress.create(opts(compress=kind, **kw), world, params, grad)
    short = {k: v[:1] for k, v in own.items()}
    assert not compress.load_state(c.state()[0], own, "other.")
    assert not compress.load_state(c.state()[0], short, prefix)
    assert not compress.load_state(c.state()[0], own | {prefix + "extra": own[next(iter(own))]}, prefix)
    assert all(not t.any() for t in c.state()[0].values())  # untouched: zeros
    for half in ("fp16", "bf16"):
        assert compress.create(opts(compress=half), world, params, grad).state() == ({}, {})


def test_bytes_on_the_wire(world):
    params, grad = model_and_grad(world)
    n = grad.numel()
    sent = {}
    for kind, kw in (("fp16", {}), ("topk", {"topk_ratio": 0.05}), ("sign", {})):
        c = compress.create(opts(compress=kind, **kw), world, params, grad)
        before = world.bytes_sent()
        c.reduce_(grad.clone(), 0)
        sent[kind] = world.bytes_sent() - before
    chunk = -(-n // world.size)
    assert sent["fp16"] == 2 * chunk * world.size + 2 * chunk  # all-to-all of 2-byte chunks + 2-byte sums
    assert sent["topk"] == 8 * round(0.05 * n)  # int32 index + float32 value per value sent
    assert sent["sign"] == -(-n // 8) + 4  # one bit per value + the scale


def test_training_with_compression(world, run_digits):
    """The same steps with each compressor: half precision lands where the exact sum does;
    the lossy ones (with error feedback) close to it."""
    sections = dict(train={"batch_size": 16, "epochs": 2 * world.size}, model={"name": "mlp", "hidden": [32]})
    exact, _ = run_digits("c-none", "allreduce", {}, **sections)
    for kind, extra, slack in (("fp16", {}, 0.01), ("bf16", {}, 0.02), ("topk", {"topk_ratio": 0.1}, 0.05),
                               ("powersgd", {"powersgd_min_numel": 0}, 0.05), ("sign", {}, 0.08)):
        row, _ = run_digits(f"c-{kind}", "allreduce", {"compress": kind} | extra, **sections)
        assert row["test_acc"] >= exact["test_acc"] - slack, (kind, row["test_acc"], exact["test_acc"])
        # half: an all-to-all of 2-byte chunks plus a 1/N allgather: (2 + 2/N) / 4 of the fp32 payload
        bound = 0.5 + 0.5 / world.size + 0.01 if kind in ("fp16", "bf16") else 0.5  # + padding to N chunks
        assert row["comm_bytes_per_step"] <= exact["comm_bytes_per_step"] * bound, (kind, row, exact)


def test_bad_compression_options():
    for kw, message in [({"compress": "gzip"}, "expected one of"), ({"topk_ratio": 0.0}, "a value > 0.0"),
                        ({"topk_ratio": 1.5}, "a value <= 1.0"), ({"powersgd_rank": 0}, "a value >= 1")]:
        with pytest.raises(UserError, match=message):
            opts(**kw)
