"""Gradient compressors, tested by being registered (mpitrain.sync.compress.REGISTRY): each
is exact where it can be (or the closest property where it cannot), carries exactly what
it did not send in its error feedback, round-trips its state, rejects a bad option with one
line, sends the bytes it declares; inside the allreduce strategy it runs per bucket on the
communication thread, and training with it lands where the uncompressed run does."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from mpitrain import config
from mpitrain.errors import UserError
from mpitrain.options import build
from mpitrain.sync.allreduce import AllreduceStrategy, Options
from mpitrain.sync.compress import REGISTRY, Compress, Compressor
from mpitrain.sync.compress.base import matrix_shape

pytestmark = pytest.mark.mpi
KINDS = list(REGISTRY)


def bucket(world, seed=0, integers=False):
    """A small model's bucket layout ((offset, shape) per parameter) and a flat gradient,
    different on every rank (small integers where a sum must be exact in 2 bytes)."""
    shapes = [torch.Size(s) for s in ((7, 10), (7,), (10, 12), (10,))]
    layout, off = [], 0
    for s in shapes:
        layout.append((off, s))
        off += s.numel()
    g = torch.Generator().manual_seed(1000 * seed + world.rank)
    grad = torch.randint(-4, 5, (off,), generator=g).float() if integers else torch.randn(off, generator=g)
    return layout, grad


def make(world, kind, layout, grad, **options):
    cls = REGISTRY[kind]
    return cls(build(cls.Options, options, "<test>", "sync.allreduce.compress"), grad, layout, world)


def exact_sum(world, grad):
    out = grad.clone()
    world.allreduce_(out)
    return out


# kind: (options, gradients, exact?) at the settings where the compressor is exact, or
# where it cannot be, the closest: half precision is exact for small integers (their sums
# fit in the mantissa), PowerSGD at full rank up to the QR's rounding, sign for gradients
# of one magnitude per rank (sign x mean |value| is then the value itself)
EXACT = {
    "fp16": ({}, "integers", True),
    "bf16": ({}, "integers", True),
    "topk": ({"ratio": 1.0}, "integers", True),  # floats: rank order, not MPI's (test_topk_sums_in_rank_order...)
    "powersgd": ({"rank": 12, "min_numel": 0}, "normal", False),
    "sign": ({}, "one magnitude", True),
}
# options that make each compressor lossy and stateful, for the state tests
LOSSY = {"fp16": {}, "bf16": {}, "topk": {"ratio": 0.1}, "powersgd": {"rank": 1, "min_numel": 0}, "sign": {}}


def test_registry_declares_the_protocol():
    assert set(EXACT) == set(REGISTRY) == set(LOSSY), "a new compressor needs its rows in EXACT and LOSSY"
    for kind, cls in REGISTRY.items():
        assert issubclass(cls, Compressor) and cls.name == kind
        assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen
        if cls.bench is not None:
            label, options = cls.bench
            assert isinstance(label, str) and build(cls.Options, options, "<test>", "x")


@pytest.mark.parametrize("kind", KINDS)
def test_exact_at_full_settings(world, kind):
    options, grads, exact = EXACT[kind]
    layout, grad = bucket(world, integers=grads == "integers")
    if grads == "one magnitude":
        grad = torch.where(grad >= 0, 1.0, -1.0) * 0.5 * (world.rank + 1)
    c = make(world, kind, layout, grad, **options)
    if kind == "powersgd":
        assert len(c.matrices) == 2  # both weight matrices compressed, at full rank
    for step in range(3):
        g = grad * (step + 1)
        want = exact_sum(world, g)
        c.reduce_(g, step)
        if exact:
            assert torch.equal(g, want), (kind, step, (g - want).abs().max())
        else:
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_topk_sums_in_rank_order_on_every_rank(world):
    """topk's decode adds one rank's values at a time, in rank order: at ratio 1 on floats the
    result is bitwise the rank-order sum on every rank (one index_add_ over all ranks'
    indices, in any other order, may differ in the last bits: a GPU's atomics pick one)."""
    layout, grad = bucket(world, seed=3)
    c = make(world, "topk", layout, grad, ratio=1.0)
    g = grad.clone()
    c.reduce_(g, 0)
    every = world.allgather_tensor(grad)
    want = torch.zeros_like(grad)
    for r in range(world.size):
        want += every[r]
    assert torch.equal(g, want)
    got = world.allgather_tensor(g)
    assert all(torch.equal(got[0], x) for x in got)  # the replicas cannot drift
    if world.size >= 3:  # the order matters for these floats: a shuffled sum differs somewhere
        shuffled = torch.zeros_like(grad)
        for r in reversed(range(world.size)):
            shuffled += every[r]
        assert not torch.equal(shuffled, want) or world.size < 3


@pytest.mark.parametrize("kind, options", [("topk", {"ratio": 0.1}), ("topk", {"ratio": 0.1, "payload": "fp16"}),
                                           ("sign", {}), ("powersgd", {"rank": 1, "min_numel": 0}),
                                           ("powersgd", {"rank": 1, "min_numel": 0, "payload": "bf16"})])
def test_error_feedback_carries_exactly_what_was_not_sent(world, kind, options):
    """sum over ranks of (gradient + old residual - new residual) is what arrived."""
    layout, grad = bucket(world, seed=1)
    c = make(world, kind, layout, grad, **options)
    for step in range(3):
        g = grad * (1 + step)
        if kind == "powersgd":
            old = [e.clone() for e in c.error]
            acc = torch.cat([(g[o:o + r * k].view(r, k) + e).reshape(-1) for (o, r, k), e in zip(c.matrices, old)])
        else:
            acc = g + c.residual
        out = g.clone()
        c.reduce_(out, step)
        if kind == "powersgd":  # the error is taken against the local P and Q (before a half payload's rounding)
            new = torch.cat([e.reshape(-1) for e in c.error])
            sent = exact_sum(world, acc - new)
            got = torch.cat([out[o:o + r * k] for o, r, k in c.matrices])
            tol = 2e-2 if options.get("payload") == "bf16" else 1e-4
            torch.testing.assert_close(got, sent, rtol=tol, atol=tol * sent.abs().max().item())
        else:
            sent = exact_sum(world, acc - c.residual)
            torch.testing.assert_close(out, sent, rtol=1e-5, atol=1e-6)
    if kind == "topk" and "payload" not in options:  # exactly k values left the rank; the rest stayed
        assert int((c.residual == 0).sum()) == c.k


@pytest.mark.parametrize("kind, options, rtol", [("fp16", {}, 2e-3), ("bf16", {}, 2e-2),
                                                 ("topk", {"ratio": 1.0, "payload": "fp16"}, 2e-3),
                                                 ("topk", {"ratio": 1.0, "payload": "bf16"}, 1e-2)])
def test_half_payload_within_its_rounding(world, kind, options, rtol):
    layout, grad = bucket(world, seed=2)
    for scale in (1.0, 1e-6, 1e4):  # fp16 is scaled into range: tiny and large gradients survive
        c = make(world, kind, layout, grad, **options)
        g = grad * scale
        want = exact_sum(world, g)
        c.reduce_(g, 0)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip(world, kind):
    """A fresh compressor given another's state continues exactly as that one does; state
    of other names or shapes does not fit (False) and changes nothing."""
    layout, grad = bucket(world, seed=3)
    a = make(world, kind, layout, grad, **LOSSY[kind])
    for step in range(2):
        a.reduce_(grad * (step + 1), step)
    shared, own = a.state_dict(), a.rank_state_dict()
    assert bool(shared) == (kind == "powersgd") and bool(own) == (kind in ("topk", "sign", "powersgd"))
    assert all(k.startswith(f"{kind}_") and isinstance(v, np.ndarray) for k, v in (shared | own).items())
    b = make(world, kind, layout, grad, **LOSSY[kind])
    assert b.load_state_dict(shared) and b.load_rank_state_dict(own)
    for step in (2, 3):
        ga, gb = grad * (step + 1), grad * (step + 1)
        a.reduce_(ga, step)
        b.reduce_(gb, step)
        assert torch.equal(ga, gb), kind
    c = make(world, kind, layout, grad, **LOSSY[kind])
    fresh = (c.state_dict(), c.rank_state_dict())
    for state, load in ((shared, c.load_state_dict), (own, c.load_rank_state_dict)):
        if state:
            k0 = next(iter(state))
            assert not load({k: v[:1] for k, v in state.items()})  # other shapes
            assert not load(state | {f"{kind}_extra": state[k0]})  # other names
            assert not load({k.replace(kind, "other", 1): v for k, v in state.items()})  # another kind's
            assert not load({})
        else:
            assert load({}) and not load({"x": np.zeros(1)})
    for got, want in zip((c.state_dict(), c.rank_state_dict()), fresh):  # unchanged
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_option_is_one_line(kind):
    fields = dataclasses.fields(REGISTRY[kind].Options)
    raws = [({"kind": kind, "no_such_option": 1}, "unknown key sync.allreduce.compress.no_such_option")]
    raws += [({"kind": kind, f.name: [1]}, f"sync.allreduce.compress.{f.name}: expected") for f in fields]
    others = {f.name for c in REGISTRY.values() for f in dataclasses.fields(c.Options)} - {f.name for f in fields}
    raws += [({"kind": kind, key: 1}, f"sync.allreduce.compress.{key} is an option of kind") for key in others]
    for table, message in raws:
        with pytest.raises(UserError) as e:
            config.from_dict({"sync": {"allreduce": {"compress": table}}}, "<test>")
        assert "\n" not in str(e.value) and message in str(e.value), (table, str(e.value))


def test_bad_options_and_the_old_keys():
    for table, message in [({"compress": {"kind": "gzip"}}, "compress.kind: expected one of 'none', 'fp16'"),
                           ({"compress": {"kind": "topk", "ratio": 0.0}}, "compress.ratio: expected a value > 0.0"),
                           ({"compress": {"kind": "topk", "ratio": 1.5}}, "a value <= 1.0"),
                           ({"compress": {"kind": "powersgd", "rank": 0}}, "compress.rank: expected a value >= 1"),
                           ({"compress": {"kind": "topk", "payload": "fp8"}}, "compress.payload: expected one of"),
                           ({"compress": {"rank": 2}}, "compress.rank is an option of kind 'powersgd', not of the "
                                                       "selected kind 'none'"),
                           ({"compress": "fp16"}, "sync.allreduce.compress = 'fp16' is now "
                                                  "sync.allreduce.compress.kind (write it in a "
                                                  "[sync.allreduce.compress] table, or --set "
                                                  "sync.allreduce.compress.kind=fp16)"),
                           ({"topk_ratio": 0.1}, "sync.allreduce.topk_ratio is now sync.allreduce.compress.ratio"),
                           ({"powersgd_rank": 2}, "sync.allreduce.powersgd_rank is now sync.allreduce.compress.rank"),
                           ({"powersgd_start_step": 2}, "start_step is now sync.allreduce.compress.start_step"),
                           ({"powersgd_min_numel": 2}, "powersgd_min_numel is now sync.allreduce.compress.min_numel")]:
        for strategy in ("allreduce", "bmuf"):  # an allreduce table is validated also when not selected
            with pytest.raises(UserError) as e:
                config.from_dict({"sync": {"strategy": strategy, "allreduce": table}}, "<test>")
            assert "\n" not in str(e.value) and message in str(e.value), (table, str(e.value))
    with pytest.raises(UserError, match="hierarchical = true does not combine with compress.kind = 'topk'"):
        AllreduceStrategy(build(Options, {"hierarchical": True, "compress": {"kind": "topk"}}, "t", "x"), None)


def test_the_saved_config_is_a_valid_job_file():
    cfg = config.from_dict({"sync": {"allreduce": {"compress": {"kind": "powersgd", "rank": 4, "payload": "bf16"}}}})
    assert cfg.sync.options.compress == Compress.of("powersgd", REGISTRY["powersgd"].Options(rank=4, payload="bf16"))
    table = cfg.to_dict()["sync"]["allreduce"]["compress"]
    assert table == {"kind": "powersgd", "rank": 4, "start_step": 0, "min_numel": 4096, "payload": "bf16"}
    import tomllib
    assert config.from_dict(tomllib.loads(cfg.dumps())) == cfg
    assert config.from_dict(config.Config().to_dict()).sync.options.compress.kind == "none"


WIRE = [("fp16", {}), ("bf16", {}), ("topk", {"ratio": 0.05}), ("topk", {"ratio": 0.05, "payload": "bf16"}),
        ("sign", {}), ("powersgd", {"rank": 2, "min_numel": 0}), ("powersgd", {"rank": 2, "min_numel": 100}),
        ("powersgd", {"rank": 3, "min_numel": 0, "payload": "fp16"}), ("powersgd", {"rank": 2, "min_numel": 10**6})]


@pytest.mark.parametrize("kind, options", WIRE)
def test_bytes_on_the_wire_are_the_declared(world, kind, options):
    layout, grad = bucket(world)
    c = make(world, kind, layout, grad, **options)
    before = world.bytes_sent()
    c.reduce_(grad.clone(), 0)
    sent = world.bytes_sent() - before
    cls = REGISTRY[kind]
    matrices = [matrix_shape(s) for _, s in layout if len(s) >= 2]
    wire = cls.wire(grad.numel(), matrices, world.size, c.options)
    assert all(k in ("allreduce", "allgather", "alltoall") for k, _ in wire)
    assert sent == sum(b for _, b in wire), (kind, options, wire)


# -- inside the allreduce strategy --------------------------------------------------------

class _Recording(Compressor):
    """A test compressor: the exact sum, recording where and with which step it ran."""

    Options = REGISTRY["sign"].Options  # no keys
    name = "recording"
    calls: list = []

    def reduce_(self, buf, step):
        self.calls.append((step, threading.current_thread().name, buf.numel()))
        self.world.allreduce_(buf)

    @classmethod
    def wire(cls, numel, matrices, world_size, options):
        return [("allreduce", 4 * numel)]


def _strategy(world, compress, resources, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7))
    spec = compress if isinstance(compress, Compress) else Compress.of(compress["kind"], build(
        REGISTRY[compress["kind"]].Options, {k: v for k, v in compress.items() if k != "kind"}, "t", "x"))
    s = AllreduceStrategy(Options(bucket_mb=400 / 2**20, first_bucket_mb=100 / 2**20, compress=spec, **options),
                          world, world.logger())
    s.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), resources)
    return s, model


def _step(world, s, model, step, before_finish=None):
    g = torch.Generator().manual_seed(100 * step + world.rank)
    for p in model.parameters():
        p.grad.zero_()
    model(torch.randn(5, 12, generator=g)).square().sum().backward()
    if before_finish is not None:
        before_finish()
    s.after_backward(step)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("overlap", ["thread", "none", "nonblocking"])
def test_runs_per_bucket_where_the_allreduce_would(world, monkeypatch, overlap):
    """One compressor per bucket; on the communication thread with overlap = thread
    (nonblocking becomes thread), at finish with none; the first step after setup waits
    for finish (its number is known only then), later ones get step + 1."""
    import contextlib

    monkeypatch.setitem(REGISTRY, "recording", _Recording)
    _Recording.calls = []
    with contextlib.ExitStack() as resources:
        s, model = _strategy(world, Compress.of("recording", _Recording.Options()), resources, overlap=overlap)
        n = len(s.buckets.buffers)
        assert n >= (2 if overlap == "none" else 3)  # without overlap, no small first bucket
        assert len(s.compressors) == n and s.state_dict() == {} and s.rank_state_dict() == {}
        thread = overlap in ("thread", "nonblocking") and world.thread_multiple
        seen = []

        def before_finish():  # overlapped: the buckets are reduced before after_backward is called
            if thread and seen:  # (not in the first step: its number is not known yet)
                for _ in range(500):
                    if len(_Recording.calls) == (len(seen) + 1) * n:
                        break
                    threading.Event().wait(0.01)
            seen.append(len(_Recording.calls))
        for step in (7, 8, 9):
            _step(world, s, model, step, before_finish)
        assert seen == ([0, 2 * n, 3 * n] if thread else [0, n, 2 * n]), seen
        assert s.buckets.overlap == ("thread" if thread else "none")
        assert [c[0] for c in _Recording.calls] == [7] * n + [8] * n + [9] * n
        assert {c[1] for c in _Recording.calls} == {"mpitrain-comm" if thread else threading.current_thread().name}
        assert [c[2] for c in _Recording.calls[:n]] == [b.numel() for b in s.buckets.buffers]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("compress", [{"kind": "topk", "ratio": 1.0}, {"kind": "powersgd", "rank": 1, "min_numel": 0},
                                      {"kind": "powersgd", "rank": 1, "min_numel": 0, "payload": "bf16"},
                                      {"kind": "sign"}])
def test_strategy_state_round_trip_and_bytes(world, compress):
    """The strategy's state methods in the checkpoint's shape: a second strategy loaded
    with the first one's state_dict and rank_state_dict reduces exactly alike; a step sends
    the bytes its compressors declare; exact compression equals the dense sum."""
    import contextlib

    with contextlib.ExitStack() as resources:
        a, ma = _strategy(world, compress, resources, overlap="thread")
        b, mb = _strategy(world, compress, resources, overlap="thread")
        dense, md = _strategy(world, Compress(), resources, overlap="thread")
        for step in range(3):
            before = world.bytes_sent()
            got = _step(world, a, ma, step)
            assert world.bytes_sent() - before == sum(n for _, n in a.wire()), (compress, a.wire())
            want = _step(world, dense, md, step)
            if compress.get("ratio") == 1.0:  # the dense sum, up to the order of the sum's terms
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        shared, own = a.state_dict(), a.rank_state_dict()
        kind = compress["kind"]
        assert set(shared) == ({"compress"} if kind == "powersgd" else set())
        stateful = {str(i) for i, c in enumerate(a.compressors) if c.own}  # PowerSGD: buckets with a matrix
        assert set(own) == {"compress"} and set(own["compress"]) == stateful and stateful
        b.load_state_dict(shared)
        b.load_rank_state_dict(own)
        for step in (3, 4):
            assert torch.equal(_step(world, a, ma, step), _step(world, b, mb, step)), compress
        # nothing fits: the state stays as set up, one info line (rank 0)
        c, _ = _strategy(world, compress, resources, overlap="none")
        fresh = c.rank_state_dict()
        lines = []
        c.log = type("L", (), {"info": lambda self, m: lines.append(m)})()
        c.load_rank_state_dict({"compress": {"0": {"other_residual": np.zeros(3)}}})
        c.load_rank_state_dict(None)  # another world size: nothing to load, nothing said
        assert len(lines) == (1 if world.is_root else 0)
        assert not lines or (f"holds no {kind} state" in lines[0] and "buckets 0" in lines[0])
        assert all(np.array_equal(x, y) for i in fresh["compress"]
                   for x, y in zip(c.rank_state_dict()["compress"][i].values(), fresh["compress"][i].values()))


# -- training -----------------------------------------------------------------------------

def test_training_with_compression(world, run_digits):
    """The same steps with each compressor: half precision lands where the exact sum does;
    the lossy ones (with error feedback) close to it; a bf16 payload composes with PowerSGD
    and sends less."""
    sections = dict(train={"batch_size": 16, "epochs": 2 * world.size}, model={"name": "mlp", "hidden": [32]})
    exact, _ = run_digits("c-none", "allreduce", {}, **sections)
    rows = {}
    for name, table, slack in (("fp16", {"kind": "fp16"}, 0.01), ("bf16", {"kind": "bf16"}, 0.02),
                               ("topk", {"kind": "topk", "ratio": 0.1}, 0.05),
                               ("powersgd", {"kind": "powersgd", "min_numel": 0}, 0.05),
                               ("powersgd-bf16", {"kind": "powersgd", "min_numel": 0, "payload": "bf16"}, 0.05),
                               ("sign", {"kind": "sign"}, 0.08)):
        row, _ = run_digits(f"c-{name}", "allreduce", {"compress": table}, **sections)
        rows[name] = row
        assert row["test_acc"] >= exact["test_acc"] - slack, (name, row["test_acc"], exact["test_acc"])
        # half: an all-to-all of 2-byte chunks plus a 1/N allgather: (2 + 2/N) / 4 of the fp32 payload
        bound = 0.5 + 0.5 / world.size + 0.01 if name in ("fp16", "bf16") else 0.5  # + padding to N chunks
        assert row["comm_bytes_per_step"] <= exact["comm_bytes_per_step"] * bound, (name, row, exact)
    fp32, bf16 = rows["powersgd"]["comm_bytes_per_step"], rows["powersgd-bf16"]["comm_bytes_per_step"]
    assert bf16 < fp32 if world.size > 1 else bf16 <= fp32, (bf16, fp32)  # one rank: (2 + 2/1) bytes per value


# -- sign: bits packed on the gradient's device, in np.packbits's format ------------------

@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_sign_bits_are_numpys_packbits(n):
    from mpitrain.sync.compress.sign import pack_bits, unpack_bits

    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), np.packbits(flags.numpy()))
    assert np.array_equal(unpack_bits(packed, n).numpy(), np.unpackbits(packed.numpy(), count=n))
    assert torch.equal(unpack_bits(packed, n).bool(), flags)


def _sign_on_the_host(c, buf):
    """sign's reduce_ as it was (bits to the host, packed and unpacked in numpy): the reference."""
    acc = buf + c.residual
    scale = acc.abs().mean()
    positive = acc >= 0
    c.residual.copy_(acc - torch.where(positive, scale, -scale))
    bits = torch.from_numpy(np.packbits(positive.cpu().numpy()))
    all_bits = c.world.allgather_tensor(bits).cpu().numpy()
    scales = c.world.allgather_tensor(scale.reshape(1).float()).reshape(-1).tolist()
    buf.fill_(-sum(scales))
    for s, row in zip(scales, all_bits):
        b = torch.from_numpy(np.unpackbits(row, count=buf.numel())).to(buf.device, buf.dtype)
        buf.add_(b, alpha=2 * s)


def test_sign_reduces_bitwise_as_the_host_decode(world):
    """The device-side bits change nothing: every step's sum and residual are bitwise the
    numpy version's, also after a rollback to the committed residual."""
    layout, grad = bucket(world, seed=5)
    ours, ref = make(world, "sign", layout, grad), make(world, "sign", layout, grad)
    ours.commit()
    kept = ref.residual.clone()
    for step in range(4):
        g = grad * (1 + step) + 0.25 * step
        a, b = g.clone(), g.clone()
        ours.reduce_(a, step)
        _sign_on_the_host(ref, b)
        assert torch.equal(a, b) and torch.equal(ours.residual, ref.residual), step
        if step == 1:  # a skipped step: both go back to the committed residual
            ours.rollback()
            ref.residual.copy_(kept)
        else:
            ours.commit()
            kept = ref.residual.clone()


def test_sign_packs_with_torch_not_numpy(world, monkeypatch):
    """The bits are made and read by torch ops on the gradient's device (a CUDA gradient's
    bits never go through numpy; checked on CPU by taking numpy's bit functions away)."""
    def no(*args, **kwargs):
        raise AssertionError("sign packed or unpacked bits in numpy")
    monkeypatch.setattr(np, "packbits", no)
    monkeypatch.setattr(np, "unpackbits", no)
    layout, grad = bucket(world, seed=6)
    g = grad.clone()
    make(world, "sign", layout, grad).reduce_(g, 0)
    assert torch.isfinite(g).all()
