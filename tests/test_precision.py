"""fp16 loss scaling: every rank skips the same steps and keeps the same scale. torch's
GradScaler runs on CPU too, so the agreement is tested here without a GPU (jobs refuse
fp16 on CPU: there it is only slower than bf16)."""

import pytest
import torch

from mpitrain.precision import Precision

pytestmark = pytest.mark.mpi


def setup(world, reduced):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, Precision("fp16", torch.device("cpu"), world, reduced=reduced)


def backward(model, prec, poison: bool):
    model.zero_grad()
    loss = model(torch.ones(3, 4)).pow(2).sum()
    prec.scale(loss).backward()
    if poison:
        model.weight.grad[0, 0] = float("inf")


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(world):
    model, opt, prec = setup(world, reduced=False)
    before = [p.detach().clone() for p in model.parameters()]
    scale = prec.scaler.get_scale()
    backward(model, prec, poison=world.rank == world.size - 1)
    assert prec.step(opt) is False  # skipped everywhere, not only on the rank that overflowed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert prec.scaler.get_scale() == scale / 2
    assert len(set(world.allgather(prec.scaler.get_scale()))) == 1
    backward(model, prec, poison=False)
    assert prec.step(opt) is True and not torch.equal(before[0], model.weight)


def test_scaled_step_equals_the_plain_step(world):
    """Without overflow, scaling by a power of two and unscaling is exact."""
    model, opt, prec = setup(world, reduced=True)
    ref, ref_opt, _ = setup(world, reduced=True)
    for _ in range(3):
        backward(model, prec, poison=False)
        assert prec.step(opt, clip_norm=5.0)
        ref.zero_grad()
        ref(torch.ones(3, 4)).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
        ref_opt.step()
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(model.parameters(), ref.parameters()))


def test_fp32_and_bf16_have_no_scaler(world):
    for name in ("fp32", "bf16"):
        prec = Precision(name, torch.device("cpu"), world, reduced=True)
        assert prec.scaler is None and prec.scale(torch.tensor(2.0)) == 2.0
    with Precision("bf16", torch.device("cpu"), world, reduced=True).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_loss_scale_survives_a_checkpoint(world, tmp_path):
    """The scale and its growth counter go through a checkpoint file; the restored scaler
    then skips, grows and steps exactly as the original."""
    import numpy as np

    from mpitrain import checkpoint

    model, opt, prec = setup(world, reduced=True)
    prec.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for poison in (True, False, False):  # one back-off, then two good steps towards growth
        backward(model, prec, poison)
        prec.step(opt)
    state = prec.state_dict()
    assert float(state["scale"][0]) == 2.0**9 and int(state["growth_tracker"][0]) == 2
    tree = {"position": {"step": 3, "epoch": 0, "samples_in_epoch": 0}, "model": {}, "optim": {"param_groups": "[]"},
            "precision": state, "ranks": {"0": {"rng": {"torch_cpu": np.zeros(4, np.uint8)}}}}
    checkpoint.write(tmp_path / "c.h5", tree, {"world_size": world.size})
    back = checkpoint.read(tmp_path / "c.h5")["precision"]
    _, _, fresh = setup(world, reduced=True)
    fresh.scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    assert fresh.load_state_dict(back) is True
    twin, twin_opt, _ = setup(world, reduced=True)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    for poison in (False, True, False):  # grows at the first step (3rd good one), then backs off
        backward(model, prec, poison)
        backward(twin, fresh, poison)
        assert prec.step(opt) == fresh.step(twin_opt)
        assert prec.scaler.get_scale() == fresh.scaler.get_scale()
    assert prec.scaler.get_scale() == 2.0**9  # grew to 2**10, backed off to 2**9
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert Precision("bf16", torch.device("cpu"), world, reduced=True).state_dict() == {}
    assert fresh.load_state_dict({}) is False  # a checkpoint without it: a fresh scale


@pytest.mark.parametrize("kind", ["topk", "powersgd", "sign", "fp16", "bf16"])
def test_an_fp16_overflow_leaves_the_compressors_state_as_before(world, kind):
    """An fp16 overflow reaches the compressors with the reduction (per bucket, during
    backward) before the scaler finds it; the skipped step puts every compressor's state
    (residuals, PowerSGD's Q) back bit for bit, so training goes on instead of skipping
    every later step. Residuals are kept unscaled: the same after a step at loss scale 1
    and at 2^10."""
    import contextlib

    import numpy as np

    from mpitrain import config
    from mpitrain.step import Step
    from mpitrain.sync import create
    from mpitrain.sync.compress import REGISTRY

    assert kind in REGISTRY and set(REGISTRY) <= {"topk", "powersgd", "sign", "fp16", "bf16"}  # all of them
    compress = {"kind": kind, **({"ratio": 0.5} if kind == "topk" else {}),
                **({"rank": 1, "min_numel": 0} if kind == "powersgd" else {})}
    spec = config.from_dict({"sync": {"strategy": "allreduce", "allreduce": {"compress": compress,
                                                                             "overlap": "thread"}}}).sync

    def run(scales, bad_at=None):
        """States after each step at these loss scales (an overflow at step `bad_at`)."""
        with contextlib.ExitStack() as resources:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            strategy = create(spec, world)
            strategy.setup(model, opt, resources)
            prec = Precision("fp16", torch.device("cpu"), world, reduced=True)
            step = Step(model, opt, strategy, prec, world, loss_fn=lambda out, y: (out - y).pow(2).sum())
            gen = torch.Generator().manual_seed(world.rank)
            states, skipped = [], []
            for i, s in enumerate(scales):
                x, y = torch.randn(3, 4, generator=gen), torch.full((3, 2), 0.5)
                prec.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127 if i == bad_at else s,
                                                   growth_interval=10**6)
                skipped.append(step([lambda: (x, y)], 3 * world.size).skipped)
                states.append({k: a.copy() for c in strategy.compressors
                               for k, a in (c.rank_state_dict() | c.state_dict()).items()})
            params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
            return states, skipped, params

    states, skipped, params = run([1.0, 1.0, 1.0, 1.0, 1.0], bad_at=2)
    assert skipped == [False, False, True, False, False]
    for k in states[1]:  # the skipped step left the state bitwise as it was before it
        assert np.array_equal(states[1][k], states[2][k]), k
    assert all(np.isfinite(a).all() for s in states for a in s.values())
    got = world.allgather(params)
    assert all(np.array_equal(got[0], g) for g in got) and np.isfinite(params).all()
    # unscaled residuals: a run whose loss scale grows to 2^10 keeps the same state
    scaled, _, scaled_params = run([1.0, 2.0**10, 2.0**10])
    plain, _, plain_params = run([1.0, 1.0, 1.0])
    for k in plain[-1]:
        np.testing.assert_allclose(scaled[-1][k], plain[-1][k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(scaled_params, plain_params, rtol=1e-5, atol=1e-7)
