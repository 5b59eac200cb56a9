"""Token streams and float targets: the windows every rank reads, and the bad inputs."""

import h5py
import numpy as np
import pytest

from mpitrain.comm import shard_bounds
from mpitrain.config import DataCfg
from mpitrain.data import hdf5
from mpitrain.errors import AgreedError, UserError

pytestmark = pytest.mark.mpi


def write_tokens(path, train, test=None, vocab_size=50, dtype=np.uint16):
    with h5py.File(path, "w") as f:
        if vocab_size is not None:
            f.attrs["vocab_size"] = vocab_size
        f.create_dataset("train/tokens", data=np.asarray(train, dtype=dtype))
        if test is not None:
            f.create_dataset("test/tokens", data=np.asarray(test, dtype=dtype))


@pytest.fixture
def stream(world, shared_tmp):
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 50, 1001), rng.integers(0, 50, 300)
    path = shared_tmp / "tok.h5"
    if world.is_root:
        write_tokens(path, train, test)
    world.barrier()
    return path, train, test


@pytest.mark.parametrize("mode", ["partitioned", "replicated"])
def test_windows_cover_the_stream_once(world, stream, mode):
    path, train, test = stream
    L = 7
    split, test_split, meta = hdf5.load(DataCfg(path=str(path), seq_len=L, mode=mode, read_chunk=13,
                                                window_offset="fixed"), world)
    n = (len(train) - 1) // L
    assert meta.task == "lm" and meta.vocab_size == 50 and meta.input_shape == (L,)
    assert split.total == n and test_split.total == (len(test) - 1) // L
    lo, hi = (0, n) if mode == "replicated" else shard_bounds(n, world.size, world.rank)
    assert split.offset == lo and len(split.tokens) == (hi - lo) * L + 1  # its range + one token of overlap
    x, y = split.take(np.arange(lo, hi))
    for i, w in enumerate(range(lo, hi)):
        assert np.array_equal(x[i], train[w * L:w * L + L]) and np.array_equal(y[i], train[w * L + 1:w * L + L + 1])
    # the test windows, evaluated sharded, cover the test stream once across ranks
    tlo, thi = shard_bounds(test_split.total, world.size, world.rank)
    tx, _ = test_split.take(np.arange(tlo, thi))
    assert world.sum(len(tx)) == test_split.total


@pytest.mark.parametrize("mode", ["partitioned", "replicated"])
def test_each_epoch_draws_new_windows_and_every_token_is_a_target_once(world, shared_tmp, mode):
    """data.window_offset = "random": epoch e's windows start at a seeded shift s_e in
    [0, L), the same on every rank; each rank still reads only its range (+ L tokens), and
    over the ranks every token of [s_e + 1, s_e + n L] is a target exactly once."""
    path = shared_tmp / "pos.h5"
    T, L = 1003, 8
    if world.is_root:
        write_tokens(path, np.arange(T) % 50, vocab_size=50, dtype=np.uint16)  # (position mod 50)
        with h5py.File(path, "a") as f:
            del f["train/tokens"]
            f["train/tokens"] = np.arange(T, dtype=np.int32)  # a token is its own position
            f.attrs["vocab_size"] = T
    world.barrier()
    split, _, _ = hdf5.load(DataCfg(path=str(path), seq_len=L, mode=mode, test="", read_chunk=50), world)
    n = (T - L) // L
    lo, hi = (0, n) if mode == "replicated" else shard_bounds(n, world.size, world.rank)
    assert split.total == n and len(split.tokens) == (hi - lo) * L + L  # its range + L tokens of overlap
    shifts = []
    for epoch in range(6):
        split.seed = 3
        s = split.set_epoch(epoch)
        shifts.append(s)
        x, y = split.take(np.arange(lo, hi))
        assert np.array_equal(x[:, 0], s + np.arange(lo, hi) * L) and np.array_equal(y, x + 1)
        mine = y.reshape(-1) if mode == "partitioned" or world.is_root else np.zeros(0, np.int64)
        every = np.sort(np.concatenate(world.allgather(mine)))
        assert np.array_equal(every, np.arange(s + 1, s + n * L + 1))  # each a target exactly once
    assert len(set(shifts)) > 1 and all(0 <= s < L for s in shifts)
    assert world.allgather(shifts) == [shifts] * world.size  # the same windows on every rank


def test_float_targets_are_regression(world, shared_tmp):
    path = shared_tmp / "reg.h5"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)).astype(np.float32), rng.standard_normal((40, 2))
    if world.is_root:
        with h5py.File(path, "w") as f:
            for g in ("train", "test"):
                f[f"{g}/x"], f[f"{g}/y"] = x, y
    world.barrier()
    split, _, meta = hdf5.load(DataCfg(path=str(path), mode="replicated"), world)
    assert (meta.task, meta.num_outputs, meta.input_shape) == ("regress", 2, (3,))
    assert split.y.dtype == np.float32 and np.allclose(split.y, y)
    assert meta.factory_kwargs() == {"input_shape": (3,), "num_outputs": 2}


def _bad_file(world, shared_tmp, name, **kw):
    path = shared_tmp / name
    if world.is_root:
        write_tokens(path, **kw)
    world.barrier()
    return str(path)


@pytest.mark.parametrize("kw, cfg, message", [
    (dict(train=range(40)), dict(seq_len=0), "set data.seq_len"),
    (dict(train=range(40), test=range(40)), dict(seq_len=200), "use a smaller data.seq_len"),
    (dict(train=range(40), test=range(3)), dict(seq_len=8), "test/tokens has 3 tokens"),
    (dict(train=range(60), vocab_size=50), dict(seq_len=4), "token ids must lie in [0, vocab_size = 50)"),
    (dict(train=range(40), vocab_size=None), dict(seq_len=4), "needs a file attribute vocab_size"),
    (dict(train=range(40), vocab_size=1), dict(seq_len=4), "needs a file attribute vocab_size"),
    (dict(train=np.zeros(40), dtype=np.float32), dict(seq_len=4), "must be a 1-D integer dataset"),
])
def test_bad_token_data_is_one_agreed_error(world, shared_tmp, kw, cfg, message):
    path = _bad_file(world, shared_tmp, "bad.h5", **kw)
    with pytest.raises((UserError, AgreedError)) as e:
        hdf5.load(DataCfg(path=path, test="test" if "test" in kw else "", **cfg), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_seq_len_on_sample_data_is_an_error(world, digits_h5):
    with pytest.raises(UserError, match="data.seq_len applies to token streams"):
        hdf5.load(DataCfg(path=str(digits_h5), seq_len=8), world)


def test_non_finite_targets(world, shared_tmp):
    path = shared_tmp / "nan.h5"
    if world.is_root:
        y = np.zeros(20, dtype=np.float32)
        y[7] = np.nan
        with h5py.File(path, "w") as f:
            f["train/x"], f["train/y"] = np.zeros((20, 2), np.float32), y
    world.barrier()
    with pytest.raises(UserError, match="row 7 is not finite"):
        hdf5.load(DataCfg(path=str(path), test="", mode="replicated"), world)
