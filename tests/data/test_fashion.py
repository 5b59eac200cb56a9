"""`mpitrain data fashion-mnist`: the upstream IDX files (Debian's dataset-fashion-mnist) ->
HDF5 with the official split, uint8 pixels and a scale the loader applies."""

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpitrain.config import DataCfg
from mpitrain.data import fashion, hdf5
from mpitrain.errors import UserError

pytestmark = pytest.mark.mpi
INSTALLED = Path(fashion.DEFAULT_DIR, "train-labels-idx1-ubyte.gz").is_file()
needs_package = pytest.mark.skipif(not INSTALLED, reason="apt package dataset-fashion-mnist not installed "
                                                        "(scripts/setup.sh installs it where apt has it)")


@pytest.fixture(scope="module")
def fashion_h5(world, tmp_path_factory):
    path = Path(world.bcast(str(tmp_path_factory.mktemp("fashion")) if world.is_root else None)) / "f.h5"
    if world.is_root:
        fashion.prepare(str(path))
    world.barrier()
    return path


@needs_package
def test_official_split_uint8_and_scale(world, fashion_h5):
    with h5py.File(fashion_h5, "r") as f:
        assert f["train/x"].shape == (60000, 28, 28) and f["train/x"].dtype == np.uint8
        assert f["test/x"].shape == (10000, 28, 28) and f.attrs["num_classes"] == 10
        assert np.array_equal(np.bincount(f["train/y"][:]), np.full(10, 6000))
        assert np.array_equal(np.bincount(f["test/y"][:]), np.full(10, 1000))
        assert f["train/x"].attrs["scale"] == pytest.approx(1 / 255)
    train, test, meta = hdf5.load(DataCfg(path=str(fashion_h5), mode="replicated"), world)
    assert train.x.dtype == np.float32 and 0 <= train.x.min() and train.x.max() <= 1
    assert train.x.mean() == pytest.approx(0.2860, abs=1e-3)  # the published pixel mean
    assert meta.input_shape == (28, 28) and meta.num_classes == 10


@needs_package
def test_missing_and_corrupt_files_name_the_file_and_the_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fashion.DEFAULT_DIR, src)
    labels = src / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[100] ^= 1
    labels.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz: corrupt or not Fashion-MNIST .*dataset-fashion-mnist"):
        fashion.prepare(str(tmp_path / "o.h5"), str(src))
    labels.unlink()
    with pytest.raises(UserError, match="no t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        fashion.prepare(str(tmp_path / "o.h5"), str(src))
    (src / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: unreadable"):
        fashion.prepare(str(tmp_path / "o.h5"), str(src))
