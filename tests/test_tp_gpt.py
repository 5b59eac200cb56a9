"""The built-in gpt split over T tensor-parallel ranks (mpitrain/parallel/tp_gpt.py): at
T = the world size, and at T = 2 beside another pair (world.split) at 4 ranks, the split
gpt's logits (gathered here only, to compare), loss and gradients (this rank's slices of the
unsplit gpt's gradients; the replicated parameters' whole gradients, the same on every rank
of tp) equal the unsplit gpt's; names() and gather_state_dict() give the unsplit layout;
dropout > 0 keeps the replicated activations equal over tp; sizes T does not divide are one
line.

The slices expected here are derived independently of names() (the fused c_attn: q rows
[0, C), k [C, 2C), v [2C, 3C), head h at rows h C / H of each). Every comparison is made on
every rank after the last collective of the test and agreed over the world."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpitrain.errors import UserError
from mpitrain.models.gpt import gpt as build_gpt
from mpitrain.parallel.tp_gpt import TensorParallelGPT, check_tp_sizes

pytestmark = pytest.mark.mpi

# float64: rtol 1e-10; float32: rtol 1e-5 and atol 1e-5 times the expected tensor's largest
# magnitude (the split sums its partial products in another order: a logit near zero among
# logits of order 1 differs by a few 1e-6 in float32)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5), "exact": (0, 0)}
I = "exact"

V, SEQ, LAYERS, HEADS, EMBD = 24, 8, 2, 12, 24  # 12 heads of 2: T = 1, 2, 3 and 4 divide heads and vocabulary


@pytest.fixture(params=["T=N", "T=2"])
def tp(request, world):
    """The tensor-parallel World: the whole world, or (at 4 ranks) pairs {0, 1}, {2, 3}, each
    pair with its own data."""
    if request.param == "T=N":
        yield world
        return
    if world.size != 4:
        pytest.skip(f"T = 2 beside another group is tested at 4 ranks, not {world.size}")
    sub = world.split(world.rank // 2)
    yield sub
    sub.free()


def _gen(world, tp, salt: int = 0) -> torch.Generator:
    """Seeded alike on every rank of one tp group (groups differ)."""
    return torch.Generator().manual_seed(1000 * (world.rank // tp.size) + salt)


def _agree(world, checks) -> None:
    errs = []
    for name, got, want, dtype in checks:
        rtol, atol = TOL[dtype]
        if dtype == torch.float32 and want is not None and want.numel():
            atol *= float(want.detach().abs().max())  # float32: rounding scales with the tensor's largest values
        if got is None:
            errs.append(f"{name}: missing (None)")
            continue
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as e:
            errs.append(f"{name}: {' '.join(str(e).split())[:300]}")
    bad = [f"rank {r}: {e}" for r, es in enumerate(world.allgather(errs)) for e in es]
    assert not bad, "\n".join(bad)


def _same(name, got, want):
    """A check that two Python values are equal (names, keys)."""
    return (f"{name}: {got!r} != {want!r}" if got != want else name, torch.tensor(got == want), torch.tensor(True), I)


def _make_gpt(gen, dtype, bias=False, tied=True, dropout=0.0):
    """The unsplit gpt with weights large enough that every part matters (the gpt's own
    init gives near-uniform logits)."""
    torch.manual_seed(0)
    model = build_gpt((SEQ,), V, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD, dropout=dropout, bias=bias)
    if not tied:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.copy_(1 + 0.2 * noise if ".ln_" in f".{name}" and name.endswith("weight") else 0.3 * noise)
    return model


def _expected(name: str, tp) -> tuple[str, int | None, int | None, int | None]:
    """The unsplit name and this rank's slice, derived here from the gpt's layout."""
    T, r, C = tp.size, tp.rank, EMBD
    rows = lambda n, offset=0: (offset + r * n // T, offset + (r + 1) * n // T)  # noqa: E731
    kind = name.rsplit(".", 1)[-1]
    if name in ("wte.weight", "lm_head.weight"):
        return name, 0, *rows(V)
    for j, which in enumerate("qkv"):
        if f".attn.{which}." in name:
            return name.replace(f".attn.{which}.", ".attn.c_attn."), 0, *rows(C, j * C)
    if ".mlp.c_fc." in name:
        return name, 0, *rows(4 * C)
    if name.endswith("c_proj.weight"):
        return name, 1, *rows(4 * C if ".mlp." in name else C)
    assert kind in ("weight", "bias"), name
    return name, None, None, None  # LayerNorms, wpe, the row layers' biases


def _slice(t, dim, start, stop):
    return t if dim is None else t.narrow(dim, start, stop - start)


CASES = [(torch.float64, False, True), (torch.float64, True, True), (torch.float32, False, True),
         (torch.float64, True, False)]


@pytest.mark.parametrize("dtype,bias,tied", CASES, ids=["f64", "f64-bias", "f32", "f64-bias-untied"])
def test_split_gpt_equals_the_unsplit_gpt(world, tp, dtype, bias, tied):
    gen = _gen(world, tp)
    ref = _make_gpt(gen, dtype, bias, tied)
    idx = torch.randint(0, V, (2, SEQ), generator=gen)
    idx[0, :2] = torch.tensor([0, V - 1])  # both ends of the vocabulary
    targets = torch.randint(0, V, (2, SEQ), generator=gen)
    targets[1, :2] = torch.tensor([V - 1, 0])

    model = TensorParallelGPT.from_gpt(ref, tp=tp)
    with torch.no_grad():
        shard = model(idx)
    logits = torch.cat(tp.allgather_tensor(shard.contiguous()).unbind(0), dim=-1) if tp.size > 1 else shard
    loss = model.loss(idx, targets)
    loss.backward()
    params = dict(model.named_parameters())
    replicated = [n for n in params if _expected(n, tp)[1] is None]
    grads_over_tp = {n: (tp.allgather_tensor(params[n].grad) if tp.size > 1 else params[n].grad[None])
                     for n in replicated}

    full_logits = ref(idx)
    full_loss = F.cross_entropy(full_logits.reshape(-1, V), targets.reshape(-1))
    full_loss.backward()
    full = dict(ref.named_parameters())

    r, T = tp.rank, tp.size
    checks = [("logits shard", shard, full_logits[..., r * V // T:(r + 1) * V // T], dtype),
              ("gathered logits", logits, full_logits, dtype), ("loss", loss, full_loss, dtype),
              ("tied", torch.tensor(model.lm_head.weight is model.wte.weight), torch.tensor(tied), I),
              _same("names", model.names(), {n: _expected(n, tp) for n in params})]
    for n, p in params.items():
        full_name, dim, start, stop = _expected(n, tp)
        checks += [(f"{n} weights", p, _slice(full[full_name], dim, start, stop), I),
                   (f"{n} grad", p.grad, _slice(full[full_name].grad, dim, start, stop), dtype)]
    for n, g in grads_over_tp.items():  # replicated: no tensor-parallel reduction needed
        checks.append((f"{n} grad the same on every rank of tp", g, g[:1].expand_as(g), I))
    _agree(world, checks)


def test_names_and_gather_state_dict(world, tp):
    """gather_state_dict() is the unsplit gpt's state_dict (keys, order, values, the tie),
    the gpt loads it strictly, and load_full_state_dict keeps this rank's slices."""
    dt = torch.float64
    gen = _gen(world, tp, 1)
    checks = []
    for bias, tied in ((False, True), (True, False)):
        ref = _make_gpt(gen, dt, bias, tied)
        model = TensorParallelGPT.from_gpt(ref, tp=tp)
        got = model.gather_state_dict()
        want = ref.state_dict()
        checks.append(_same(f"keys bias={bias}", list(got), list(want)))
        checks += [(f"{k} bias={bias}", got[k], want[k], I) for k in want if k in got]
        if tied:
            checks.append(("lm_head.weight is wte.weight", torch.tensor(got["lm_head.weight"] is got["wte.weight"]),
                           torch.tensor(True), I))
        other = _make_gpt(gen, dt, bias, tied)
        other.load_state_dict(got, strict=True)
        checks += [(f"{k} loaded bias={bias}", v, want[k], I) for k, v in other.state_dict().items()]
        fresh = _make_gpt(gen, dt, bias, tied)  # different weights, then the gathered ones
        split = TensorParallelGPT.from_gpt(fresh, tp=tp)
        split.load_full_state_dict(got)
        checks += [(f"{n} reloaded bias={bias}", p, q, I)
                   for (n, p), q in zip(split.named_parameters(), model.parameters())]
    _agree(world, checks)


def test_pipeline_blocks_compose_to_forward(world, tp):
    dt = torch.float64
    gen = _gen(world, tp, 2)
    model = TensorParallelGPT.from_gpt(_make_gpt(gen, dt), tp=tp)
    idx = torch.randint(0, V, (2, SEQ), generator=gen)
    blocks = model.pipeline_blocks()
    with torch.no_grad():
        x = idx
        for b in blocks:
            x = b(x)
        y = model(idx)
    pipe_params = {id(p) for b in blocks for p in b.parameters()}
    _agree(world, [("blocks", torch.tensor(len(blocks)), torch.tensor(LAYERS + 2), I), ("output", x, y, I),
                   ("every parameter in a block", torch.tensor(pipe_params == {id(p) for p in model.parameters()}),
                    torch.tensor(True), I)])


def test_dropout_keeps_replicated_activations_equal(world, tp):
    """p > 0 (training): the global generator differs on every rank (as `mpitrain train`
    seeds it) and is left untouched; the replicated parameters' gradients stay the same on
    every rank of tp (the replicated dropouts drew alike), dropout does drop, the same seed
    gives the same loss; in eval mode the split gpt equals the unsplit one."""
    dt = torch.float64
    gen = _gen(world, tp, 3)
    ref = _make_gpt(gen, dt, dropout=0.3)
    idx = torch.randint(0, V, (2, SEQ), generator=gen)
    targets = torch.randint(0, V, (2, SEQ), generator=gen)
    torch.manual_seed(12345 + 7919 * world.rank)  # per-rank streams
    state = torch.get_rng_state()

    model = TensorParallelGPT.from_gpt(ref, tp=tp)  # seed: tp rank 0's torch.initial_seed()
    losses = [model.loss(idx, targets) for _ in range(2)]
    losses[0].backward()
    untouched = torch.equal(state, torch.get_rng_state())
    again = TensorParallelGPT.from_gpt(ref, tp=tp).loss(idx, targets)
    seeded = [TensorParallelGPT.from_gpt(ref, tp=tp, seed=5).loss(idx, targets) for _ in range(2)]
    grads = {n: (tp.allgather_tensor(p.grad) if tp.size > 1 else p.grad[None])
             for n, p in model.named_parameters() if model.names()[n][1] is None}
    model.eval()
    ref.eval()
    with torch.no_grad():
        eval_loss = model.loss(idx, targets)
        want_eval = F.cross_entropy(ref(idx).reshape(-1, V), targets.reshape(-1))

    checks = [("global generator untouched", torch.tensor(untouched), torch.tensor(True), I),
              ("same seed, same loss", again, losses[0], I),
              ("explicit seed, same loss", seeded[1], seeded[0], I),
              ("eval loss", eval_loss, want_eval, dt)]
    differ = [not torch.equal(losses[0], losses[1]), not torch.equal(losses[0], eval_loss),
              not torch.equal(seeded[0], losses[0])]
    checks.append(("dropout drops (losses differ)", torch.tensor(differ), torch.tensor([True] * 3), I))
    for n, g in grads.items():
        checks.append((f"{n} grad the same on every rank of tp", g, g[:1].expand_as(g), I))
    _agree(world, checks)


def test_sizes_tp_does_not_divide_are_one_line(world):
    T = world.size
    if T == 1:
        pytest.skip("every size divides over 1 rank")
    errs = []

    def expect(text, fn):
        try:
            fn()
            errs.append(f"{text}: no error")
        except UserError as e:
            if not str(e).startswith(text) or "\n" in str(e):
                errs.append(f"{e!r} does not start with {text!r}")

    odd = 4 * T + 1
    pad = 4 * T + T
    torch.manual_seed(0)
    expect(f"vocab_size = {odd} is not divisible by the {T} tensor-parallel ranks (pad it: vocab_size = {pad}",
           lambda: TensorParallelGPT.from_gpt(build_gpt((SEQ,), odd, n_layer=1, n_head=T, n_embd=4 * T), tp=world))
    expect(f"model.args.n_head = {T + 1} is not divisible by the {T} tensor-parallel ranks",
           lambda: TensorParallelGPT.from_gpt(build_gpt((SEQ,), 4 * T, n_layer=1, n_head=T + 1,
                                                        n_embd=4 * (T + 1)), tp=world))
    assert world.allgather(errs) == [[]] * world.size


def test_check_tp_sizes():
    check_tp_sizes(24, 12, 24, 4)
    with pytest.raises(UserError, match=r"^vocab_size = 65 is not divisible by the 2 tensor-parallel ranks "
                                        r"\(pad it: vocab_size = 66"):
        check_tp_sizes(65, 2, 8, 2)
    with pytest.raises(UserError, match=r"^the MLP width 4 \* n_embd = 12 is not divisible by the 8"):
        check_tp_sizes(24, 8, 3, 8)
    with pytest.raises(UserError, match="tensor-parallel size must be a positive integer"):
        check_tp_sizes(24, 12, 24, 0)
