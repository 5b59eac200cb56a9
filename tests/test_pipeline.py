"""Pipeline parallelism (mpitrain.pipeline): one step of GPipe and 1F1B at P stages (x D
replicas where P divides the world size) equals one process's gradient of the whole batch;
shapes may change between steps; a failing stage fails every stage with one line."""

import pytest
import torch
import torch.nn.functional as F

import mpitrain
from mpitrain.errors import AgreedError, UserError
from mpitrain.parallel.pipeline import PipelineError, balance

pytestmark = pytest.mark.mpi


def _blocks(dtype=torch.float64):
    torch.manual_seed(0)
    widths = [5, 16, 16, 12, 12, 8, 3]
    return [torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh()).to(dtype) for a, b in zip(widths, widths[1:])]


def _batch(world, d: int, n: int = 12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + d)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_one_step_equals_one_process(world, schedule, stages, m):
    if world.size % stages:
        with pytest.raises(AgreedError, match="stages = .* must divide the world size"):
            mpitrain.pipeline(_blocks(), stages=stages, micro_batches=m, schedule=schedule, loss_fn=F.cross_entropy,
                              world=world)
        return
    pipe = mpitrain.pipeline(_blocks(), stages=stages, micro_batches=m, schedule=schedule, loss_fn=F.cross_entropy,
                             world=world)
    d = world.rank // stages
    x, y = _batch(world, d)
    loss = pipe.step(x, y)
    assert pipe.held_peak <= pipe.promised
    # one process: the mean loss of every replica's batch, its gradient
    ref = torch.nn.Sequential(*_blocks())
    replicas = world.size // stages
    total = sum(F.cross_entropy(ref(_batch(world, r)[0]), _batch(world, r)[1]) for r in range(replicas)) / replicas
    total.backward()
    want = F.cross_entropy(ref(x), y).item()
    assert abs(loss - want) < 1e-12
    mine = dict(pipe.module.named_parameters())
    offset = sum(len(p) for p in [list(ref)[:0]])
    sizes = balance([sum(p.numel() for p in b.parameters()) + 1.0 for b in _blocks()], stages)
    first = sum(sizes[:pipe.stage])
    for name, p in mine.items():
        block, rest = name.split(".", 1)
        q = dict(ref[first + int(block)].named_parameters())[rest]
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert offset == 0
    # the next step may have another batch size (a last short batch): no shape agreed in advance
    pipe.module.zero_grad()
    x2, y2 = _batch(world, d, n=7)
    assert pipe.step(x2, y2) == pytest.approx(F.cross_entropy(torch.nn.Sequential(*_blocks())(x2), y2).item())
    pipe.free()


def test_a_failing_stage_fails_every_stage_with_one_line(world):
    stages = world.size
    pipe = mpitrain.pipeline(_blocks(), stages=stages, micro_batches=2, loss_fn=F.cross_entropy, world=world)
    x, y = _batch(world, 0)
    with pytest.raises(PipelineError) as e:
        pipe.step(x, y[:5] if pipe.last else y)  # the last stage's targets do not fit
    assert "\n" not in str(e.value) and "pipeline stage" in str(e.value)
    with pytest.raises(UserError, match="an earlier step failed"):  # its unmatched messages: not again
        pipe.step(x, y)
    pipe.free()
    pipe = mpitrain.pipeline(_blocks(), stages=stages, micro_batches=2, loss_fn=F.cross_entropy, world=world)
    with pytest.raises(PipelineError, match="needs the inputs x on the first stage"):
        pipe.step(None, None)
    pipe.free()


def test_bad_settings_are_one_line(world):
    for kw, match in [({"stages": 99}, "must divide|more than"), ({"micro_batches": 0}, "micro_batches"),
                      ({"schedule": "zigzag"}, "schedule"), ({"split_sizes": [1] * world.size}, "split")]:
        args = {"stages": world.size, "micro_batches": 2, "loss_fn": F.cross_entropy, **kw}
        with pytest.raises(AgreedError, match=match) as e:
            mpitrain.pipeline(_blocks(), world=world, **args)
        assert "\n" not in str(e.value)
    assert isinstance(AgreedError("x"), UserError)


def test_balance_minimises_the_slowest_stage():
    assert balance([1, 1, 1, 1], 2) == [2, 2]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert balance([1, 2, 3, 4, 5, 6], 3) in ([3, 1, 2], [4, 1, 1], [3, 2, 1])


def _gpt_blocks():
    from mpitrain.models.gpt import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.0, bias=True).double() \
        .pipeline_blocks()


def _lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt_with_its_tied_head_equals_one_process(world, schedule):
    """Embedding and head share one weight: split over the first and last stage, each
    holds a copy; their gradients are summed between the two (and stay equal)."""
    stages = max(s for s in (1, 2, 4) if world.size % s == 0)
    pipe = mpitrain.pipeline(_gpt_blocks(), stages=stages, micro_batches=3, schedule=schedule, loss_fn=_lm_loss,
                             world=world)
    gen = torch.Generator().manual_seed(7 + world.rank // stages)
    idx, y = torch.randint(0, 11, (6, 6), generator=gen), torch.randint(0, 11, (6, 6), generator=gen)
    loss = pipe.step(idx, y)
    ref_blocks = _gpt_blocks()
    ref = torch.nn.Sequential(*ref_blocks)
    replicas = world.size // stages
    batches = []
    for r in range(replicas):
        g = torch.Generator().manual_seed(7 + r)
        batches.append((torch.randint(0, 11, (6, 6), generator=g), torch.randint(0, 11, (6, 6), generator=g)))
    (sum(_lm_loss(ref(i), t) for i, t in batches) / replicas).backward()
    assert loss == pytest.approx(_lm_loss(torch.nn.Sequential(*_gpt_blocks())(idx), y).item(), rel=1e-12)
    sizes = balance([sum(p.numel() for p in b.parameters()) + 1.0 for b in _gpt_blocks()], stages)
    first = sum(sizes[:pipe.stage])
    for j, block in enumerate(pipe.module):
        for p, q in zip(block.parameters(), ref_blocks[first + j].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert (len(pipe.tied) == 1) == (stages > 1 and (pipe.first or pipe.last))
    pipe.free()


def test_bench_pipeline_runs_every_layout_that_fits(world, capsys):
    """`mpitrain bench pipeline` at any world size: a row per layout whose P divides it."""
    import argparse

    from mpitrain import bench

    args = argparse.Namespace(stages="1,2,4", schedules="gpipe,1f1b", micro="2", layers=2, width=16, heads=2, seq=8,
                              vocab=11, batch=4, steps=1, repeats=1)
    bench.pipeline(args, world, world.logger())
    rows = world.bcast([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
                       if world.is_root else None)
    assert len(rows) == 2 * len([p for p in (1, 2, 4) if world.size % p == 0]), rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        held, promised = cells[8].split()
        assert int(held) <= int(promised.strip("()")), row
