"""Tensor-parallel layers (mpitrain/parallel/tensor.py): at T = the world size, and at T = 2
beside two groups (world.split) at 4 ranks, every layer's forward and backward equals the
unsplit torch module on one process (this rank's slices of the weight gradients equal the
slices of the full gradients), a Column -> GELU -> Row MLP equals the unsplit MLP, the
vocab-parallel cross-entropy equals F.cross_entropy with its gradient, a split model
starts equal to the unsplit one, and a size T does not divide is one line.

Every comparison is made on every rank after the last collective of the test and agreed
over the world (world.allgather), so a rank whose check fails never leaves the others
waiting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpitrain.errors import UserError
from mpitrain.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                               gather_from_tp, reduce_from_tp, scatter_to_tp, tp_sizes,
                               vocab_parallel_cross_entropy)

pytestmark = pytest.mark.mpi

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), "exact": (0, 0)}
I = "exact"  # integers and flags: equal


@pytest.fixture(params=["T=N", "T=2"])
def tp(request, world):
    """The tensor-parallel World: the whole world, or (at 4 ranks) pairs of ranks {0, 1},
    {2, 3}, each pair with its own data."""
    if request.param == "T=N":
        yield world
        return
    if world.size != 4:
        pytest.skip(f"T = 2 beside another group is tested at 4 ranks, not {world.size}")
    sub = world.split(world.rank // 2)
    yield sub
    sub.free()


def _group(world, tp) -> int:
    return world.rank // tp.size


def _gen(world, tp, salt: int = 0) -> torch.Generator:
    """A generator that every rank of one tp group seeds alike (groups differ)."""
    return torch.Generator().manual_seed(1000 * _group(world, tp) + salt)


def _lo(tp, n: int) -> slice:
    part = n // tp.size
    return slice(tp.rank * part, (tp.rank + 1) * part)


def _agree(world, checks) -> None:
    """checks: (name, got, want, dtype) compared on this rank; the test fails on every rank
    if any rank's comparison failed (each message names its rank)."""
    errs = []
    for name, got, want, dtype in checks:
        rtol, atol = TOL[dtype]
        if got is None:
            errs.append(f"{name}: missing (None)")
            continue
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as e:
            errs.append(f"{name}: {' '.join(str(e).split())[:300]}")
    bad = [f"rank {r}: {e}" for r, es in enumerate(world.allgather(errs)) for e in es]
    assert not bad, "\n".join(bad)


# -- sizes ---------------------------------------------------------------------------------------------

def test_tp_sizes():
    assert tp_sizes(12, 3) == [4, 4, 4]
    assert tp_sizes(7, 1) == [7]
    assert tp_sizes(0, 4) == [0, 0, 0, 0]
    with pytest.raises(UserError) as e:
        tp_sizes(10, 3, "out_features")
    assert str(e.value) == "out_features = 10 is not divisible by the 3 tensor-parallel ranks"
    for bad in (0, -2, 1.5):
        with pytest.raises(UserError, match="tensor-parallel size must be a positive integer"):
            tp_sizes(12, bad)


def test_bad_sizes_are_one_line(world):
    T = world.size
    if T == 1:
        pytest.skip("every size divides over 1 rank")
    n = 4 * T + 1
    cases = [("out_features", lambda: ColumnParallelLinear(8, n, tp=world)),
             ("in_features", lambda: RowParallelLinear(n, 8, tp=world)),
             ("num_embeddings", lambda: VocabParallelEmbedding(n, 4, tp=world)),
             ("the last dimension of the input", lambda: scatter_to_tp(torch.zeros(2, n), world))]
    errs = []
    for what, make in cases:
        try:
            make()
            errs.append(f"{what}: no error")
        except UserError as e:
            want = f"{what} = {n} is not divisible by the {T} tensor-parallel ranks"
            if str(e) != want:
                errs.append(f"{what}: {e!r} != {want!r}")
    assert world.allgather(errs) == [[]] * world.size


# -- the operators -------------------------------------------------------------------------------------

def test_operators(world, tp):
    """f, g, gather and scatter forward and backward, with a different upstream gradient on
    each rank (what the sums must add up)."""
    T, r, dt = tp.size, tp.rank, torch.float64
    gen = _gen(world, tp)
    x = torch.randn(3, 4, generator=gen, dtype=dt)
    ups = torch.randn(T, 3, 4, generator=gen, dtype=dt)  # rank q's upstream gradient: ups[q]
    parts = torch.randn(T, 3, 4, generator=gen, dtype=dt)  # rank q's input to g / gather: parts[q]
    full = torch.randn(3, 4 * T, generator=gen, dtype=dt)
    up_full = torch.randn(T, 3, 4 * T, generator=gen, dtype=dt)

    a = x.clone().requires_grad_()
    fa = copy_to_tp(a, tp)
    (fa * ups[r]).sum().backward()

    b = parts[r].clone().requires_grad_()
    gb = reduce_from_tp(b, tp)
    (gb * ups[r]).sum().backward()

    c = parts[r].clone().requires_grad_()
    gc = gather_from_tp(c, tp)
    (gc * up_full[r]).sum().backward()

    d = full.clone().requires_grad_()
    sd = scatter_to_tp(d, tp)
    (sd * ups[r]).sum().backward()

    cols = _lo(tp, 4 * T)
    _agree(world, [("f forward", fa, x, dt), ("f backward", a.grad, ups.sum(0), dt),
                   ("g forward", gb, parts.sum(0), dt), ("g backward", b.grad, ups[r], dt),
                   ("gather forward", gc, torch.cat(list(parts), dim=-1), dt),
                   ("gather backward", c.grad, up_full[r][:, r * 4:(r + 1) * 4], dt),
                   ("scatter forward", sd, full[:, cols], dt),
                   ("scatter backward", d.grad, torch.cat(list(ups), dim=-1), dt)])


# -- the layers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear(world, tp, gather_output, dtype):
    gen = _gen(world, tp)
    ref = nn.Linear(12, 24, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(2, 3, 12, generator=gen, dtype=dtype)
    up = torch.randn(2, 3, 24, generator=gen, dtype=dtype)
    rows = _lo(tp, 24)

    layer = ColumnParallelLinear.from_linear(ref, tp=tp, gather_output=gather_output)
    xs = x.clone().requires_grad_()
    y = layer(xs)
    (y * (up if gather_output else up[..., rows])).sum().backward()

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * up).sum().backward()

    _agree(world, [("output", y, yr if gather_output else yr[..., rows], dtype),
                   ("input grad", xs.grad, xr.grad, dtype),
                   ("weight", layer.weight, ref.weight[rows], dtype),
                   ("weight grad", layer.weight.grad, ref.weight.grad[rows], dtype),
                   ("bias grad", layer.bias.grad, ref.bias.grad[rows], dtype)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear(world, tp, input_is_parallel, dtype):
    gen = _gen(world, tp)
    ref = nn.Linear(24, 12, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(2, 3, 24, generator=gen, dtype=dtype)
    up = torch.randn(2, 3, 12, generator=gen, dtype=dtype)
    cols = _lo(tp, 24)

    layer = RowParallelLinear.from_linear(ref, tp=tp, input_is_parallel=input_is_parallel)
    xs = (x[..., cols] if input_is_parallel else x).clone().requires_grad_()
    y = layer(xs)
    (y * up).sum().backward()

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * up).sum().backward()

    _agree(world, [("output", y, yr, dtype),
                   ("input grad", xs.grad, xr.grad[..., cols] if input_is_parallel else xr.grad, dtype),
                   ("weight grad", layer.weight.grad, ref.weight.grad[:, cols], dtype),
                   ("bias grad", layer.bias.grad, ref.bias.grad, dtype)])


@pytest.mark.parametrize("padding_idx", [None, 5])
def test_vocab_parallel_embedding(world, tp, padding_idx):
    dt = torch.float64
    gen = _gen(world, tp)
    ref = nn.Embedding(24, 6, padding_idx=padding_idx, dtype=dt)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24, 6, generator=gen, dtype=dt))
    ids = torch.randint(0, 24, (4, 7), generator=gen)
    ids[0, :3] = torch.tensor([0, 23, 23])  # both ends of the vocabulary, a repeated id
    ids[1, 0] = 5
    up = torch.randn(4, 7, 6, generator=gen, dtype=dt)
    rows = _lo(tp, 24)

    layer = VocabParallelEmbedding.from_embedding(ref, tp=tp)
    y = layer(ids)
    (y * up).sum().backward()
    yr = ref(ids)
    (yr * up).sum().backward()

    _agree(world, [("output", y, yr, dt), ("weight", layer.weight, ref.weight[rows], dt),
                   ("weight grad", layer.weight.grad, ref.weight.grad[rows], dt)])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mlp_equals_the_unsplit_mlp(world, tp, dtype, device):
    """Column(gather_output=False) -> GELU -> Row: one allreduce forward (g), one backward (f)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = _gen(world, tp)
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12)).to(device, dtype)
    x = torch.randn(4, 5, 12, generator=gen, dtype=dtype).to(device)
    up = torch.randn(4, 5, 12, generator=gen, dtype=dtype).to(device)
    hidden = _lo(tp, 24)

    mlp = nn.Sequential(ColumnParallelLinear.from_linear(ref[0], tp=tp), nn.GELU(),
                        RowParallelLinear.from_linear(ref[2], tp=tp))
    before = world.bytes_sent()
    xs = x.clone().requires_grad_()
    y = mlp(xs)
    forward_bytes = world.bytes_sent() - before
    (y * up).sum().backward()
    backward_bytes = world.bytes_sent() - before - forward_bytes

    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * up).sum().backward()

    T, size = tp.size, x.element_size()
    _agree(world, [("output", y, yr, dtype), ("input grad", xs.grad, xr.grad, dtype),
                   ("column weight grad", mlp[0].weight.grad, ref[0].weight.grad[hidden], dtype),
                   ("column bias grad", mlp[0].bias.grad, ref[0].bias.grad[hidden], dtype),
                   ("row weight grad", mlp[2].weight.grad, ref[2].weight.grad[:, hidden], dtype),
                   ("row bias grad", mlp[2].bias.grad, ref[2].bias.grad, dtype),
                   # bytes this rank handed to MPI: the output (g) forward, the input gradient (f) backward
                   ("forward bytes", torch.tensor(forward_bytes), torch.tensor(y.numel() * size * (T > 1)), I),
                   ("backward bytes", torch.tensor(backward_bytes), torch.tensor(x.numel() * size * (T > 1)), I)])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vocab_parallel_cross_entropy(world, tp, reduction, dtype, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = _gen(world, tp)
    V = 24
    logits = (torch.randn(3, 5, V, generator=gen, dtype=dtype) * 4).to(device)
    logits[0, 0] += 1000.0  # a row whose exp overflows without the shift by its maximum
    target = torch.randint(0, V, (3, 5), generator=gen).to(device)
    target[0, :3] = torch.tensor([0, V - 1, -100])  # both ends of the vocabulary, an ignored row
    target[2, 4] = -100
    cols = _lo(tp, V)

    shard = logits[..., cols].clone().requires_grad_()
    before = world.bytes_sent()
    loss = vocab_parallel_cross_entropy(shard, target, tp, reduction=reduction)
    sent = world.bytes_sent() - before
    up = torch.randn(loss.shape, generator=gen, dtype=dtype).to(device)
    (loss * up).sum().backward()

    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.reshape(-1, V), target.reshape(-1), reduction=reduction)
    ref = ref.reshape(target.shape) if reduction == "none" else ref
    (ref * up).sum().backward()

    rows, size = target.numel(), logits.element_size()
    _agree(world, [("loss", loss, ref, dtype), ("logits grad", shard.grad, full.grad[..., cols], dtype),
                   ("dtype", torch.tensor(loss.dtype == dtype), torch.tensor(True), I),
                   # a max per row, then the sum of exp and the target logit per row
                   ("bytes", torch.tensor(sent), torch.tensor(3 * rows * size * (tp.size > 1)), I)])


def test_cross_entropy_of_a_column_parallel_head(world, tp):
    """Embedding -> Column head (gather_output=False) -> vocab-parallel loss equals the
    unsplit model with F.cross_entropy: the logits are never gathered."""
    dt = torch.float64
    gen = _gen(world, tp)
    torch.manual_seed(3)
    emb, head = nn.Embedding(24, 8, dtype=dt), nn.Linear(8, 24, dtype=dt)
    ids = torch.randint(0, 24, (2, 6), generator=gen)
    target = torch.randint(0, 24, (2, 6), generator=gen)

    pemb, phead = VocabParallelEmbedding.from_embedding(emb, tp=tp), ColumnParallelLinear.from_linear(head, tp=tp)
    loss = vocab_parallel_cross_entropy(phead(pemb(ids)), target, tp)
    loss.backward()
    ref = F.cross_entropy(head(emb(ids)).reshape(-1, 24), target.reshape(-1))
    ref.backward()

    rows = _lo(tp, 24)
    _agree(world, [("loss", loss, ref, dt), ("embedding grad", pemb.weight.grad, emb.weight.grad[rows], dt),
                   ("head grad", phead.weight.grad, head.weight.grad[rows], dt),
                   ("head bias grad", phead.bias.grad, head.bias.grad[rows], dt)])


# -- initialisation ------------------------------------------------------------------------------------

def test_a_split_model_starts_equal_to_the_unsplit_one(world, tp):
    dt = torch.float64
    out, hidden = _lo(tp, 24), _lo(tp, 24)
    checks = []
    # torch's global generator, seeded alike: the same draws as nn.Linear / nn.Embedding
    torch.manual_seed(11)
    ref_col, ref_row, ref_emb = nn.Linear(12, 24, dtype=dt), nn.Linear(24, 12, dtype=dt), nn.Embedding(24, 6, dtype=dt)
    torch.manual_seed(11)
    col, row, emb = (ColumnParallelLinear(12, 24, tp=tp, dtype=dt), RowParallelLinear(24, 12, tp=tp, dtype=dt),
                     VocabParallelEmbedding(24, 6, tp=tp, dtype=dt))
    after_split = torch.rand(1)
    torch.manual_seed(11)
    nn.Linear(12, 24, dtype=dt), nn.Linear(24, 12, dtype=dt), nn.Embedding(24, 6, dtype=dt)
    checks += [("column weight", col.weight, ref_col.weight[out], dt), ("column bias", col.bias, ref_col.bias[out], dt),
               ("row weight", row.weight, ref_row.weight[:, hidden], dt), ("row bias", row.bias, ref_row.bias, dt),
               ("embedding", emb.weight, ref_emb.weight[out], dt),
               ("global generator advanced as by the unsplit layers", after_split, torch.rand(1), I)]
    torch.manual_seed(2)
    ref_col = nn.Linear(12, 24, bias=False, dtype=dt)
    torch.manual_seed(2)
    col, row = ColumnParallelLinear(12, 24, bias=False, tp=tp, dtype=dt), RowParallelLinear(24, 12, False, tp=tp)
    checks += [("column weight without bias", col.weight, ref_col.weight[out], dt),
               ("no bias", torch.tensor(col.bias is None and row.bias is None), torch.tensor(True), I)]
    # a generator (or an int seed): the draws of the global generator seeded with it, which stays untouched
    state = torch.random.get_rng_state()
    col = ColumnParallelLinear(12, 24, tp=tp, dtype=dt, generator=torch.Generator().manual_seed(5))
    emb = VocabParallelEmbedding(24, 6, tp=tp, dtype=dt, generator=6)
    untouched = torch.equal(state, torch.random.get_rng_state())
    torch.manual_seed(5)
    ref_col = nn.Linear(12, 24, dtype=dt)
    torch.manual_seed(6)
    ref_emb = nn.Embedding(24, 6, dtype=dt)
    checks += [("seeded column weight", col.weight, ref_col.weight[out], dt),
               ("seeded column bias", col.bias, ref_col.bias[out], dt),
               ("seeded embedding", emb.weight, ref_emb.weight[out], dt),
               ("global generator untouched", torch.tensor(untouched), torch.tensor(True), I)]
    # init(full weight): the bias starts at zero
    fill = lambda w: w.copy_(torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape))  # noqa: E731
    row = RowParallelLinear(24, 12, tp=tp, dtype=dt, init=fill)
    full = torch.arange(12 * 24, dtype=dt).reshape(12, 24)
    checks += [("init weight", row.weight, full[:, hidden], dt), ("init bias", row.bias, torch.zeros(12, dtype=dt), dt),
               ("parameter is not a view of the full weight",
                torch.tensor(row.weight.untyped_storage().nbytes()), torch.tensor(row.weight.numel() * 8), I)]
    _agree(world, checks)


# -- misuse ------------------------------------------------------------------------------------------------

def test_misuse_is_one_clear_error(world):
    """Raised on every rank before any collective (the inputs are the same everywhere)."""
    T = world.size
    errs = []

    def expect(exc, text, fn):
        try:
            fn()
            errs.append(f"{text}: no error")
        except exc as e:
            if text not in str(e):
                errs.append(f"{text!r} not in {e!r}")

    row = RowParallelLinear(24, 4, tp=world)
    if T > 1:
        expect(ValueError, "pass input_is_parallel=False", lambda: row(torch.zeros(2, 24)))
    expect(IndexError, "target 24 is out of range for the vocabulary of 24",
           lambda: vocab_parallel_cross_entropy(torch.zeros(2, 24 // T), torch.tensor([1, 24]), world))
    expect(ValueError, "does not match logits",
           lambda: vocab_parallel_cross_entropy(torch.zeros(2, 24 // T), torch.tensor([1, 2, 3]), world))
    expect(ValueError, "reduction must be one of",
           lambda: vocab_parallel_cross_entropy(torch.zeros(2, 24 // T), torch.tensor([1, 2]), world, reduction="avg"))
    emb = VocabParallelEmbedding(24, 3, tp=world)
    expect(IndexError, "id 24 is out of range for num_embeddings = 24", lambda: emb(torch.tensor([0, 24])))
    expect(UserError, "not supported",
           lambda: VocabParallelEmbedding.from_embedding(nn.Embedding(24, 3, max_norm=1.0), tp=world))
    assert world.allgather(errs) == [[]] * world.size
