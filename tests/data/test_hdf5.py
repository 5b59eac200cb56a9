"""Parallel-HDF5 data: partitioned/replicated reads, generators, validation errors."""

import h5py
import numpy as np
import pytest

from mpitrain.comm import World, shard_bounds
from mpitrain.config import DataCfg
from mpitrain.data import hdf5, prepare
from mpitrain.errors import AgreedError

pytestmark = pytest.mark.mpi


def test_partitioned_reads_only_the_shard(world, digits_h5):
    with h5py.File(digits_h5, "r") as f:
        x_all, y_all = f["train/x"][:], f["train/y"][:]
    part, test, meta = hdf5.load(DataCfg(path=str(digits_h5), read_chunk=50), world)
    lo, hi = shard_bounds(len(y_all), world.size, world.rank)
    assert part.offset == lo and len(part.y) == hi - lo and part.total == len(y_all)
    assert np.array_equal(part.x, x_all[lo:hi]) and np.array_equal(part.y, y_all[lo:hi])
    assert meta.input_shape == (8, 8) and meta.num_classes == 10
    rep, _, _ = hdf5.load(DataCfg(path=str(digits_h5), mode="replicated"), world)
    assert np.array_equal(rep.x, x_all) and rep.offset == 0
    xs, ys = part.take(np.arange(lo, hi)[::-1])
    assert np.array_equal(ys, y_all[lo:hi][::-1])


def test_digits_file_layout(world, digits_h5):
    with h5py.File(digits_h5, "r") as f:
        assert f.attrs["num_classes"] == 10 and "scikit-learn" in f.attrs["source"]
        assert f["train/x"].shape == (1438, 8, 8) and f["test/x"].shape == (359, 8, 8)
        assert f["train/x"].dtype == np.float32 and f["train/y"].dtype == np.int64
        assert 0 <= f["train/x"][:].min() and f["train/x"][:].max() <= 1
        # stratified: every class is in the test split
        assert sorted(set(f["test/y"][:].tolist())) == list(range(10))


def test_synthetic_does_not_depend_on_writer_count(world, shared_tmp):
    out = shared_tmp / "syn.h5"
    prepare.synthetic(world, str(out), samples=5000, test_samples=300, features=12, classes=4, seed=3)
    if world.is_root:
        with h5py.File(out, "r") as f:
            x, y = f["train/x"][:], f["train/y"][:]
            assert x.shape == (5000, 12) and f["test/x"].shape == (300, 12)
            assert set(np.unique(y)) <= set(range(4)) and len(np.unique(y)) > 1
        # the same generator run by one writer (this rank alone) gives the same bytes
        from mpi4py import MPI

        solo = World.create(MPI.COMM_SELF)
        prepare.synthetic(solo, str(shared_tmp / "solo.h5"), samples=5000, test_samples=300,
                          features=12, classes=4, seed=3)
        with h5py.File(shared_tmp / "solo.h5", "r") as f:
            assert np.array_equal(f["train/x"][:], x) and np.array_equal(f["train/y"][:], y)
        solo.free()
    world.barrier()


def _bad_file(path, **kw):
    """A data file with train/test splits; kw replaces datasets (name -> array or None)."""
    rng = np.random.default_rng(1)
    arrays = {"train/x": rng.random((40, 5), dtype=np.float32), "train/y": rng.integers(0, 3, 40),
              "test/x": rng.random((10, 5), dtype=np.float32), "test/y": rng.integers(0, 3, 10)}
    arrays.update(kw)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f.create_dataset(k, data=v)


BAD = [
    ({"train/y": None}, "train/y: no such dataset"),
    ({"train/y": np.full(40, b"a", dtype="S1")}, "targets must be integer labels or float values"),
    ({"test/y": np.full(10, 0.5)}, "test targets (float64 ()) do not match train targets (int64 ())"),
    ({"train/x": np.array(["a"] * 40, dtype="S1").reshape(40, 1)}, "inputs must be numeric"),
    ({"train/y": np.arange(39)}, "x has 40 rows but y has 39"),
    ({"test/x": np.zeros((10, 6), np.float32)}, "test inputs have shape (6,), train (5,)"),
    ({"train/y": np.array([-1] + [0] * 39)}, "labels must lie in"),
    ({"train/x": np.zeros((0, 5), np.float32), "train/y": np.zeros(0, np.int64)}, "empty split"),
    ({"train/y": np.zeros((40, 2), np.int64)}, "integer labels must be 1-D"),
    ({"train/x": np.where(np.arange(200).reshape(40, 5) == 17, np.nan, 0.5).astype(np.float32)},
     "train/x row 3 is not finite"),
    ({"train/y": np.array([10**9] + [0] * 39)}, "labels up to 1000000000 mean 1000000001 classes"),
]


@pytest.mark.parametrize("kw, message", BAD, ids=[m for _, m in BAD])
def test_bad_data_is_one_agreed_error(world, shared_tmp, kw, message):
    path = shared_tmp / "bad.h5"
    if world.is_root:
        _bad_file(path, **kw)
    world.barrier()
    with pytest.raises(AgreedError) as e:
        hdf5.load(DataCfg(path=str(path)), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_non_hdf5_files(world, shared_tmp):
    with pytest.raises(AgreedError, match="data file not found"):
        hdf5.load(DataCfg(path=str(shared_tmp / "nope.h5")), world)
    if world.is_root:
        (shared_tmp / "text.h5").write_text("not hdf5")
    world.barrier()
    with pytest.raises(AgreedError, match="not an HDF5 file"):
        hdf5.load(DataCfg(path=str(shared_tmp / "text.h5")), world)
    with pytest.raises(AgreedError, match="no group 'training'"):
        _bad_or_make(world, shared_tmp)
        hdf5.load(DataCfg(path=str(shared_tmp / "ok.h5"), train="training"), world)


def _bad_or_make(world, shared_tmp):
    if world.is_root:
        _bad_file(shared_tmp / "ok.h5")
    world.barrier()


def test_fewer_samples_than_ranks(world, shared_tmp):
    if world.size == 1:
        return  # one rank always has enough samples
    if world.is_root:
        _bad_file(shared_tmp / "tiny.h5", **{"train/x": np.zeros((1, 5), np.float32),
                                             "train/y": np.zeros(1, np.int64)})
    world.barrier()
    with pytest.raises(AgreedError, match="cannot be partitioned over"):
        hdf5.load(DataCfg(path=str(shared_tmp / "tiny.h5")), world)


@pytest.mark.parametrize("value", ["ten", 10**9, 1, 2.5])
def test_bad_num_classes_attribute(world, shared_tmp, value):
    path = shared_tmp / "attr.h5"
    if world.is_root:
        _bad_file(path)
        with h5py.File(path, "a") as f:
            f.attrs["num_classes"] = value
    world.barrier()
    with pytest.raises(AgreedError, match="attribute num_classes must be an integer"):
        hdf5.load(DataCfg(path=str(path)), world)


def test_non_finite_check_can_be_turned_off(world, shared_tmp):
    path = shared_tmp / "nan.h5"
    if world.is_root:
        x = np.full((40, 5), 0.5, np.float32)
        x[3, 1] = np.inf
        _bad_file(path, **{"train/x": x})
    world.barrier()
    train, _, _ = hdf5.load(DataCfg(path=str(path), check_finite=False), world)
    assert train.total == 40


def test_unwritable_parallel_output_is_agreed(world, shared_tmp):
    blocker = shared_tmp / "afile"
    if world.is_root:
        blocker.write_text("")
    world.barrier()
    with pytest.raises(AgreedError, match="cannot write"):
        world.agree(prepare.synthetic, world, str(blocker / "s.h5"), 100, 10, 4, 2, 8, 0)
