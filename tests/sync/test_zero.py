"""ZeRO (sync.strategy = "zero"): the oracle is allreduce with the same optimizer (and,
for stage 1 with [sync.zero.compress], the same compressor on the same buckets). Buckets
of a few hundred bytes put several parameters in one bucket, parameters across chunk
borders and chunks of unequal sizes at 3 ranks; two parameter groups (no weight decay on
biases) give buckets per group."""

import contextlib

import numpy as np
import pytest
import torch

from mpitrain import config
from mpitrain.errors import AgreedError
from mpitrain.precision import Precision
from mpitrain.step import Step
from mpitrain.sync import create

pytestmark = pytest.mark.mpi

OPTIMIZERS = {
    "sgd": (lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3), 1e-6),
    "adam": (lambda groups: torch.optim.Adam(groups, lr=0.01), 1e-5),
    "adamw": (lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1), 1e-5),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))


def _groups(model):
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]


def run(world, sync: dict, optim: str = "sgd", steps: int = 4, clip: float = 0.0, accumulate: int = 1,
        precision: str = "fp32", hook=None):
    """The parameters (flat) after `steps` steps of a 7-13-5 MLP on rank-dependent data."""
    spec = config.from_dict({"sync": sync}).sync
    with contextlib.ExitStack() as resources:
        model = _model()
        opt = OPTIMIZERS[optim][0](_groups(model))
        strategy = create(spec, world)
        strategy.setup(model, opt, resources)
        prec = Precision(precision, torch.device("cpu"), world, reduced=True)
        step = Step(model, opt, strategy, prec, world, clip_norm=clip,
                    loss_fn=lambda out, y: (out - y).pow(2).sum())
        gen = torch.Generator().manual_seed(100 + world.rank)
        for i in range(steps):
            batches = [(torch.randn(3, 7, generator=gen), torch.randn(3, 5, generator=gen)) for _ in range(accumulate)]
            step([lambda b=b: b for b in batches], 3 * accumulate * world.size)
            if hook is not None:
                hook(i, model, opt, strategy, step)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


ZERO = {"strategy": "zero", "zero": {"bucket_mb": 400 / 2**20}}  # ~100 values per bucket
PLAIN = {"strategy": "allreduce", "allreduce": {"overlap": "none"}}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("optim", sorted(OPTIMIZERS))
def test_zero_equals_allreduce(world, stage, optim):
    zero = {**ZERO, "zero": {**ZERO["zero"], "stage": stage}}
    want = run(world, PLAIN, optim)
    got = run(world, zero, optim)
    np.testing.assert_allclose(got, want, rtol=OPTIMIZERS[optim][1], atol=1e-7)
    same = world.allgather(got)
    assert all(np.array_equal(same[0], g) for g in same)  # whole and equal on every rank


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("overlap", ["thread", "none"])
def test_clipping_accumulation_and_bf16_equal_allreduce(world, stage, overlap):
    zero = {**ZERO, "zero": {**ZERO["zero"], "stage": stage, "overlap": overlap}}
    for kw in ({"clip": 0.05}, {"accumulate": 3}, {"precision": "bf16", "optim": "adam"}):
        want = run(world, PLAIN, **kw)
        got = run(world, zero, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5 if "precision" in kw else 1e-6, atol=1e-7, err_msg=str(kw))


def test_optimizer_holds_only_this_ranks_chunks(world):
    """1/N of the optimizer state per rank (to the value, chunks differing by at most one)."""
    def check(i, model, opt, strategy, step):
        held = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
        total = sum(p.numel() for p in model.parameters())
        buckets = len(strategy.buckets)
        assert total // world.size - buckets * world.size <= held // 2 <= total // world.size + buckets, (held, total)
    run(world, {**ZERO, "zero": {**ZERO["zero"], "stage": 2}}, "adam", steps=2, hook=check)


def test_not_elementwise_optimizer_is_one_line(world):
    model = _model()
    opt = torch.optim.LBFGS(model.parameters())
    strategy = create(config.from_dict({"sync": ZERO}).sync, world)
    with contextlib.ExitStack() as resources, pytest.raises(AgreedError) as e:
        strategy.setup(model, opt, resources)
    assert "elementwise" in str(e.value) and "LBFGS" in str(e.value) and "\n" not in str(e.value)


def test_bad_stage_is_one_line():
    from mpitrain.errors import UserError

    with pytest.raises(UserError) as e:
        config.from_dict({"sync": {"strategy": "zero", "zero": {"stage": 3}}}, "<test>")
    assert "sync.zero.stage" in str(e.value) and "\n" not in str(e.value)


# -- checkpoints: the optimizer state in the unsharded layout, any world size, any strategy ---

def _job(make_cfg, run, digits_h5, strategy, world, steps, stage=2, compress=None):
    """A digits MLP with Adam on a global batch of 12 at any world size (1-4), replicated
    data in one global order: the same samples per step whatever the world size."""
    options = {"stage": stage, "bucket_mb": 0.01} if strategy == "zero" else {}
    if compress is not None:
        options["compress"] = compress
    return make_cfg(run, digits_h5, sync={"strategy": strategy, strategy: options},
                    model={"name": "mlp", "hidden": [24]}, data={"mode": "replicated", "shuffle": "global"},
                    optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "clip_norm": 1.0},
                    train={"batch_size": 12 // world.size, "epochs": 1, "max_steps": steps, "resume": "auto"},
                    output={"checkpoint_every": 0})


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_at_the_same_world_size_is_exact(world, shared_tmp, digits_h5, make_cfg, stage):
    from mpitrain.train import train

    _, ref = train(_job(make_cfg, shared_tmp / "ref", digits_h5, "zero", world, 12, stage), world, world.logger())
    train(_job(make_cfg, shared_tmp / "run", digits_h5, "zero", world, 5, stage), world, world.logger())
    _, got = train(_job(make_cfg, shared_tmp / "run", digits_h5, "zero", world, 12, stage), world, world.logger())
    assert np.array_equal(_flat(got), _flat(ref))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("written, resumed", [("zero", "zero"), ("zero", "allreduce"), ("allreduce", "zero")])
def test_resume_at_another_world_size_and_strategy(world, shared_tmp, digits_h5, make_cfg, written, resumed):
    """Written at N ranks, resumed at N - 1 (1 at N = 1) with the same global batch: equals
    the uninterrupted run at N - 1 within float summation order."""
    from mpitrain.train import train

    from mpitrain.comm import World

    comm = world.comm.Split(0 if world.rank < max(1, world.size - 1) else 1, world.rank)
    few = World.create(comm)  # N - 1 ranks training on their own (no parent world)
    comm.Free()
    try:
        train(_job(make_cfg, shared_tmp / "run", digits_h5, written, world, 5), world, world.logger())
        world.barrier()
        err = None
        if world.rank < few.size or world.size == 1:
            _, ref = train(_job(make_cfg, shared_tmp / "ref", digits_h5, resumed, few, 10), few, few.logger())
            _, got = train(_job(make_cfg, shared_tmp / "run", digits_h5, resumed, few, 10), few, few.logger())
            diff = np.abs(_flat(got) - _flat(ref)).max()
            err = None if diff <= 1e-6 + 1e-5 * np.abs(_flat(ref)).max() else f"max |difference| {diff}"
        errs = [e for e in world.allgather(err) if e]  # agreed: the ranks left out wait for none
        assert not errs, errs
    finally:
        few.free()


@pytest.mark.timeout(240)
def test_no_rank_holds_the_whole_optimizer_state_to_save_or_resume(world, shared_tmp, digits_h5, make_cfg,
                                                                   monkeypatch):
    """Saving: each rank writes only its chunks' pieces (rank 0's tree holds no whole optimizer
    array); resuming: each rank reads only its chunks (Slab.read), never a whole array."""
    from mpitrain import checkpoint
    from mpitrain.train import train

    written, read, trees = [], [], []
    write_pieces, slab_read, write_shell = checkpoint.write_pieces, checkpoint.Slab.read, checkpoint.write_shell
    slab_array = checkpoint.Slab.__array__

    def count_writes(path, tree, placed):
        written.append(sum(a.size for _, v in checkpoint._pieces(tree) for _, a in v.pieces))
        return write_pieces(path, tree, placed)

    def shell(path, tree, meta, crcs):
        trees.append(tree["optim"]["state"])
        return write_shell(path, tree, meta, crcs)

    def count_reads(self, lo, hi):
        if self.name.startswith("/optim/"):
            read.append(hi - lo)
        return slab_read(self, lo, hi)

    def whole(self, dtype=None, copy=None):
        if self.name.startswith("/optim/"):  # (the model's arrays: every rank holds the whole model)
            raise AssertionError(f"{self.name} read whole")
        return slab_array(self, dtype, copy)

    monkeypatch.setattr(checkpoint, "write_pieces", count_writes)
    monkeypatch.setattr(checkpoint, "write_shell", shell)
    monkeypatch.setattr(checkpoint.Slab, "read", count_reads)
    monkeypatch.setattr(checkpoint.Slab, "__array__", whole)
    train(_job(make_cfg, shared_tmp / "run", digits_h5, "zero", world, 5), world, world.logger())
    _, model = train(_job(make_cfg, shared_tmp / "run", digits_h5, "zero", world, 8), world, world.logger())
    n = sum(p.numel() for p in model.parameters())
    buckets = 8  # at most (bucket_mb 0.01 = 2,621 values; the digits MLP has 2,818: a handful)
    share = 2 * (n // world.size + buckets)  # exp_avg and exp_avg_sq, ceil(bucket / N) per bucket
    ok = (len(written) == 2 and max(written) <= share and 0 < sum(read) <= share
          and all(isinstance(v, checkpoint.Pieces) for t in trees for e in t.values() for v in e.values()
                  if not isinstance(v, np.ndarray) or v.ndim))
    assert all(world.allgather(ok)), (written, sum(read), share)


def test_the_python_api_equals_allreduce(world):
    """mpitrain.distribute(model, optimizer, "zero", stage=2) in a user's loop."""
    import mpitrain

    out = []
    for strategy, options in (("allreduce", {}), ("zero", {"stage": 2, "bucket_mb": 0.001}),
                              ("zero", {"stage": 1, "bucket_mb": 0.001, "overlap": "thread"})):
        model = _model()
        opt = torch.optim.Adam(_groups(model), lr=0.01)
        model, opt = mpitrain.distribute(model, opt, strategy, world=world, clip_norm=0.5, **options)
        gen = torch.Generator().manual_seed(world.rank)
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            x, y = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
            opt.backward((model(x) - y).pow(2).mean())
            opt.step()
        out.append(_flat(model))
        opt.close()
    for got in out[1:]:
        np.testing.assert_allclose(got, out[0], rtol=1e-5, atol=1e-7)


def test_offload_equals_allreduce_and_is_refused_on_cpu(world, monkeypatch):
    """ZeRO-Offload's logic on CPU: the optimizer's chunks in separate host tensors, copied
    back before the allgather (on a GPU run they are pinned host memory)."""
    from mpitrain.sync import zero

    offload = {**ZERO, "zero": {**ZERO["zero"], "offload": True}}
    with pytest.raises(AgreedError) as e:
        run(world, offload, "adam")
    assert "offload" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(zero, "OFFLOAD_ON_CPU", True)

    def separate(i, model, opt, strategy, step):
        flat = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert all(p.untyped_storage().data_ptr() not in flat for g in opt.param_groups for p in g["params"])
    for kw in ({"optim": "adam"}, {"optim": "sgd", "clip": 0.05}):
        np.testing.assert_allclose(run(world, offload, hook=separate, **kw), run(world, PLAIN, **kw), rtol=1e-5, atol=1e-7)


def test_bench_memory_prints_the_formulas(world, digits_h5, repo_root, capsys):
    """`mpitrain bench memory`: measured optimizer bytes equal the formula (1/N under zero)."""
    import argparse
    import sys

    from mpitrain import bench

    args = argparse.Namespace(job=str(repo_root / "jobs" / "digits.toml"), steps=1, variants="",
                              overrides=[f"data.path={str(digits_h5)!r}", "optim.name=adam"])
    bench.memory(args, world, world.logger())  # (the function: its module shares the name)
    memory = sys.modules["mpitrain.bench.memory"]
    out = capsys.readouterr().out
    rows = world.bcast({ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] and
                        ln.split()[0] in memory.VARIANTS} if world.is_root else None)
    assert set(rows) == set(memory.DEFAULT), rows
    for name, cells in rows.items():  # "optim (formula)": measured within a bucket's rounding of it
        measured, formula = float(cells[5]), float(cells[6].strip("()"))
        assert formula > 0 and abs(measured - formula) <= 0.002 + 0.02 * formula, (name, cells)


@pytest.mark.parametrize("payload", ["fp16", "bf16"])
def test_half_payload_sends_fewer_bytes_and_stays_close(world, payload):
    """payload = fp16/bf16: the reduce-scatter's values travel in 2 bytes, summed in float32
    by each chunk's owner; the parameters are gathered in float32 (whole and equal)."""
    from mpitrain.comm import World

    sent = {}
    for p in ("fp32", payload):
        before = World.bytes_sent()
        got = run(world, {**ZERO, "zero": {**ZERO["zero"], "payload": p}}, "sgd", steps=3)
        sent[p] = World.bytes_sent() - before
    np.testing.assert_allclose(got, run(world, PLAIN, "sgd", steps=3), rtol=2e-2, atol=2e-3)
    same = world.allgather(got)
    assert all(np.array_equal(same[0], g) for g in same)
    if world.size > 1:
        assert sent[payload] < 0.85 * sent["fp32"], sent


def test_a_checkpoint_that_does_not_fit_is_one_line_and_keeps_the_state(world, shared_tmp):
    """mpitrain.restore of another model's checkpoint into a zero optimizer: one agreed
    line, and the optimizer keeps its chunks and their state."""
    import mpitrain

    model = _model()
    model, opt = mpitrain.distribute(model, torch.optim.Adam(model.parameters(), lr=0.01), "zero", world=world)
    x, y = torch.randn(4, 7), torch.randn(4, 5)
    opt.backward((model(x) - y).pow(2).mean())
    opt.step()
    held = {id(k): {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    other = torch.nn.Linear(7, 5)
    o2, opt2 = mpitrain.distribute(other, torch.optim.Adam(other.parameters()), "allreduce", world=world)
    path = str(shared_tmp / "other.h5")
    mpitrain.save(path, o2, opt2)
    opt2.close()
    with pytest.raises(AgreedError) as e:
        mpitrain.restore(path, model, opt)
    assert "another model" in str(e.value) and "\n" not in str(e.value)
    assert {id(k) for k in opt.state} == set(held)
    for k, s in opt.state.items():
        for n, v in s.items():
            assert torch.equal(v, held[id(k)][n])
    opt.close()


# -- stage 1 with [sync.zero.compress]: each bucket's compressor instead of the reduce-scatter --

ONE = 4 / 2**20  # 4-byte buckets: one parameter per bucket, in zero and in allreduce alike
COMPRESS = {"powersgd": {"kind": "powersgd", "rank": 1, "min_numel": 0}, "topk": {"kind": "topk", "ratio": 0.3},
            "sign": {"kind": "sign"}, "fp16": {"kind": "fp16"}}


def _compressed(kind: str, overlap: str = "none") -> tuple[dict, dict]:
    """zero stage 1 and allreduce, each with compressor `kind` on one-parameter buckets:
    the same compressor sees the same gradient (and draws the same PowerSGD Q) in both."""
    table = COMPRESS[kind]
    return ({"strategy": "zero", "zero": {"stage": 1, "bucket_mb": ONE, "overlap": overlap, "compress": table}},
            {"strategy": "allreduce", "allreduce": {"overlap": "none", "bucket_mb": ONE, "first_bucket_mb": ONE,
                                                    "compress": table}})


def _one_parameter_buckets(i, model, opt, strategy, step):
    buckets = [b.params for b in strategy.buckets] if isinstance(strategy.buckets, list) else strategy.buckets.buckets
    assert len(buckets) == 4 and all(len(ps) == 1 for ps in buckets), buckets  # the oracle's premise
    assert len(strategy.compressors) == 4


@pytest.mark.parametrize("kind", sorted(COMPRESS))
@pytest.mark.parametrize("overlap", ["thread", "none"])
def test_stage_1_with_compression_equals_allreduce_with_it(world, kind, overlap):
    """The compressor's whole averaged gradient, this rank's chunk of it stepped: allreduce
    with the same compressor on the same buckets, also with clipping (the chunks' global
    norm) and gradient accumulation; the lossy ones land away from the uncompressed run
    (the compressor did run)."""
    zero, plain = _compressed(kind, overlap)
    for kw in ({}, {"clip": 0.05}, {"accumulate": 2, "optim": "adam"}):
        want = run(world, plain, hook=_one_parameter_buckets, **kw)
        got = run(world, zero, hook=_one_parameter_buckets, **kw)
        np.testing.assert_allclose(got, want, rtol=OPTIMIZERS[kw.get("optim", "sgd")][1], atol=1e-7, err_msg=str(kw))
    same = world.allgather(got)
    assert all(np.array_equal(same[0], g) for g in same)  # whole and equal on every rank
    if kind != "fp16":
        dense = run(world, PLAIN, accumulate=2, optim="adam")
        assert np.abs(got - dense).max() > 1e-4, kind


@pytest.mark.parametrize("kind", ["powersgd", "topk"])
def test_stage_1_compression_under_fp16_loss_scaling_equals_allreduce(world, kind):
    """Loss scales 2^16 and 2^127 (both overflow here: the steps skipped on every rank,
    every compressor's state rolled back bit for bit), then 1 and 2^10: the compressors see
    the gradients unscaled and keep their state in the gradient's units, as allreduce's do."""
    scales = {0: 2.0**127, 1: 1.0, 2: 2.0**10}  # the loss scale of step i + 1

    def rescale(i, model, opt, strategy, step):
        if i == 1:  # the overflow backed the scale off: that step was skipped
            assert step.precision.scaler.get_scale() < 2.0**127
        if i in scales:
            step.precision.scaler = torch.amp.GradScaler("cpu", init_scale=scales[i], growth_interval=10**6)

    zero, plain = _compressed(kind, "thread")
    want = run(world, plain, precision="fp16", steps=5, hook=rescale)
    got = run(world, zero, precision="fp16", steps=5, hook=rescale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_stage_2_with_compression_and_compression_with_a_half_payload_are_one_line(world):
    """Refused while the options are read (every rank alike, before any collective), with
    stage 2 (also by default) and next to payload = fp16/bf16; stage 1's setup line says
    what it saves."""
    from mpitrain.errors import UserError

    msgs = []
    for zero in ({"stage": 2, "compress": {"kind": "powersgd"}}, {"compress": {"kind": "topk"}},
                 {"stage": 1, "payload": "bf16", "compress": {"kind": "powersgd"}}):
        with pytest.raises(UserError) as e:
            config.from_dict({"sync": {"strategy": "zero", "zero": zero}}, "<test>")
        msgs.append(str(e.value))
    assert all("\n" not in m for m in msgs), msgs
    assert msgs[0] == ("sync.zero.compress.kind = 'powersgd' gives every rank the whole averaged gradient: only "
                       "with sync.zero.stage = 1 (which then saves no gradient memory)"), msgs[0]
    assert "'topk'" in msgs[1] and "sync.zero.stage = 1" in msgs[1], msgs[1]
    assert "sync.zero.payload = 'bf16'" in msgs[2] and "sync.zero.compress.kind = 'powersgd'" in msgs[2], msgs[2]
    lines = []
    log = type("Log", (), {"info": lambda self, m: lines.append(m)})()
    spec = config.from_dict({"sync": _compressed("powersgd")[0]}).sync
    with contextlib.ExitStack() as resources:
        model = _model()
        create(spec, world, log).setup(model, torch.optim.SGD(model.parameters(), lr=0.1), resources)
    said = world.allgather([m for m in lines if m.startswith("zero:")])
    assert len(said[0]) == 1 and all(not s for s in said[1:]), said  # rank 0 only
    assert "compress powersgd" in said[0][0] and "no gradient memory" in said[0][0], said[0]


@pytest.mark.timeout(300)
def test_stage_1_with_powersgd_resumes_exactly(world, shared_tmp, digits_h5, make_cfg, monkeypatch):
    """The compressors' state (PowerSGD's Q, every rank's error feedback) travels in the
    checkpoint and the step count with it (start_step): a resume at the same world size
    is bitwise the uninterrupted run; one whose compressors start afresh is not."""
    from mpitrain import checkpoint
    from mpitrain.sync.zero import CompressedZero
    from mpitrain.train import train

    table = {"kind": "powersgd", "rank": 1, "min_numel": 0, "start_step": 2}

    def job(name, steps):
        return _job(make_cfg, shared_tmp / name, digits_h5, "zero", world, steps, stage=1, compress=table)

    _, ref = train(job("ref", 12), world, world.logger())
    for name in ("run", "afresh"):
        train(job(name, 5), world, world.logger())
    world.barrier()
    held = None
    if world.is_root:
        tree = checkpoint.read(checkpoint.path_for(shared_tmp / "run", 5))
        held = (sorted(tree["strategy"].get("compress", {})),
                [sorted(r.get("strategy", {}).get("compress", {})) for r in tree["ranks"].values()])
    held = world.bcast(held)
    assert held[0] and all(r == held[0] for r in held[1]) and len(held[1]) == world.size, held
    _, got = train(job("run", 12), world, world.logger())
    assert np.array_equal(_flat(got), _flat(ref))
    monkeypatch.setattr(CompressedZero, "load_state_dict", lambda self, tree: None)
    monkeypatch.setattr(CompressedZero, "load_rank_state_dict", lambda self, tree: None)
    _, afresh = train(job("afresh", 12), world, world.logger())
    assert not np.array_equal(_flat(afresh), _flat(ref))
