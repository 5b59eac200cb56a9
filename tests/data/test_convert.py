"""`mpitrain data convert`: a .npz -> the HDF5 layout, streamed in chunks; random or official
test splits, uint8 inputs with a scale, float regression targets, one-line errors.

Plain tests (every rank of an MPI run does the same in its own tmp_path)."""

import h5py
import numpy as np
import pytest

from mpitrain.data import prepare
from mpitrain.errors import UserError


def _read(path):
    """{dataset name: array} and the file attributes."""
    with h5py.File(path, "r") as f:
        data = {f"{g}/{k}": f[g][k][()] for g in f for k in f[g]}
        scales = {f"{g}/x": f[g]["x"].attrs["scale"] for g in f if "scale" in f[g]["x"].attrs}
        return data, dict(f.attrs), scales


def _same_files(a, b):
    (da, aa, sa), (db, ab, sb) = _read(a), _read(b)
    assert aa == ab and sa == sb and da.keys() == db.keys()
    for k in da:
        assert da[k].dtype == db[k].dtype and da[k].shape == db[k].shape and da[k].tobytes() == db[k].tobytes(), k


def test_convert_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", images=rng.random((50, 3, 4), dtype=np.float32), labels=rng.integers(0, 3, 50))
    msg = prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "a.h5"), "images", "labels", 0.2)
    assert "train 40, test 10" in msg
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["train/x"].shape == (40, 3, 4) and f.attrs["num_classes"] == 3
    with pytest.raises(UserError, match="no array 'x'"):
        prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "b.h5"))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_random_split_is_the_seeded_permutation(tmp_path, save):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 255, (53, 2, 3), dtype=np.uint8), rng.integers(0, 4, 53)
    save(tmp_path / "a.npz", x=x, y=y)
    prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "a.h5"), test_fraction=0.3, seed=5)
    perm, n_test = np.random.default_rng(5).permutation(53), round(53 * 0.3)
    data, attrs, _ = _read(tmp_path / "a.h5")
    assert data["train/x"].dtype == np.float32 and data["train/y"].dtype == np.int64
    assert np.array_equal(data["train/x"], x[perm[n_test:]]) and np.array_equal(data["test/y"], y[perm[:n_test]])
    assert np.array_equal(data["test/x"], x[perm[:n_test]]) and np.array_equal(data["train/y"], y[perm[n_test:]])
    prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "small.h5"), test_fraction=0.3, seed=5, chunk_bytes=7)
    _same_files(tmp_path / "a.h5", tmp_path / "small.h5")


def test_truncated_npz_and_unwritable_output(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 3), np.float32), y=np.arange(10) % 2)
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable .npz"):
        prepare.convert(str(tmp_path / "cut.npz"), str(tmp_path / "b.h5"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "afile" / "b.h5"))


def test_official_split_keeps_the_test_rows_in_order(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.random((30, 4), dtype=np.float32), rng.integers(0, 5, 30)
    xt, yt = rng.random((7, 4)), rng.integers(0, 6, 7)  # float64 test inputs are stored float32 too
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "test.npz", x=xt, y=yt)
    np.savez(tmp_path / "both.npz", x=x, y=y, x_test=xt, y_test=yt)
    msg = prepare.convert(str(tmp_path / "train.npz"), str(tmp_path / "a.h5"), test_src=str(tmp_path / "test.npz"))
    assert msg == f"{tmp_path / 'a.h5'}: train 30, test 7 samples, shape (4,), 6 classes"
    prepare.convert(str(tmp_path / "both.npz"), str(tmp_path / "b.h5"), x_test_key="x_test", y_test_key="y_test")
    for out in ("a.h5", "b.h5"):
        data, attrs, _ = _read(tmp_path / out)
        assert np.array_equal(data["train/x"], x) and np.array_equal(data["train/y"], y)
        assert np.array_equal(data["test/x"], xt.astype(np.float32)) and np.array_equal(data["test/y"], yt)
        assert attrs["num_classes"] == 6 and "official test split" in attrs["description"]


def test_scale_keeps_integer_inputs(tmp_path):
    rng = np.random.default_rng(3)
    x, xt = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8), rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(20) % 3, xt=xt, yt=np.arange(6) % 3)
    msg = prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "a.h5"), x_test_key="xt", y_test_key="yt",
                          scale=1 / 255)
    assert msg.endswith("3 classes, x uint8 scale 0.00392157")
    data, _, scales = _read(tmp_path / "a.h5")
    assert data["train/x"].dtype == np.uint8 and data["test/x"].dtype == np.uint8
    assert scales == {"train/x": pytest.approx(1 / 255), "test/x": pytest.approx(1 / 255)}
    assert np.allclose(data["train/x"] * scales["train/x"], x / 255) and np.array_equal(data["test/x"], xt)
    np.savez(tmp_path / "f.npz", x=x.astype(np.float64), y=np.arange(20) % 3)  # float inputs: float32 + scale
    prepare.convert(str(tmp_path / "f.npz"), str(tmp_path / "f.h5"), scale=0.5)
    data, _, scales = _read(tmp_path / "f.h5")
    assert data["train/x"].dtype == np.float32 and scales == {"train/x": 0.5}


@pytest.mark.parametrize("shape", [(12,), (12, 3)])
def test_float_targets_are_regression(tmp_path, shape):
    rng = np.random.default_rng(4)
    y = rng.standard_normal(shape)
    np.savez(tmp_path / "r.npz", x=rng.random((12, 2)), y=y)
    msg = prepare.convert(str(tmp_path / "r.npz"), str(tmp_path / "r.h5"), test_fraction=0.25)
    assert msg.endswith("float target per row" if len(shape) == 1 else "3 float targets per row")
    data, attrs, _ = _read(tmp_path / "r.h5")
    assert "num_classes" not in attrs and data["train/y"].dtype == np.float32
    assert data["train/y"].shape == (9, *shape[1:]) and data["test/y"].shape == (3, *shape[1:])
    perm = np.random.default_rng(0).permutation(12)
    assert np.array_equal(data["test/y"], y[perm[:3]].astype(np.float32))


def test_chunked_conversion_is_byte_identical(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 60000, (101, 3, 2), dtype=np.uint16)
    np.savez(tmp_path / "a.npz", x=x, y=rng.integers(0, 9, 101), xt=rng.integers(0, 9, (17, 3, 2)).astype(">i4"),
             yt=rng.integers(0, 9, 17), xf=np.asfortranarray(x), xb=x.astype(">f8"))
    for kw in ({}, {"scale": 0.25}, {"x_key": "xf"}, {"x_key": "xb"}):
        prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "one.h5"), x_test_key="xt", y_test_key="yt", **kw)
        for chunk in (1, 13, 250):  # less than a row, a row, rows that do not divide the array
            prepare.convert(str(tmp_path / "a.npz"), str(tmp_path / "small.h5"), x_test_key="xt", y_test_key="yt",
                            chunk_bytes=chunk, **kw)
            _same_files(tmp_path / "one.h5", tmp_path / "small.h5")
    data, _, _ = _read(tmp_path / "one.h5")  # big-endian float64 inputs, read right
    assert np.array_equal(data["train/x"], x.astype(np.float32))


def test_bad_inputs_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(6)
    x, y = rng.random((10, 3)), np.arange(10) % 2
    np.savez(tmp_path / "a.npz", x=x, y=y, y9=y[:9], yneg=y - 1, s=np.array(["a"] * 10).reshape(10, 1),
             yf=np.where(y == 1, np.nan, 0.0), y2=np.zeros((10, 2), int), x1=np.zeros(10), x0=np.zeros((0, 3)),
             y0=np.zeros(0, int), xt=np.zeros((4, 5)), yt=np.zeros(4, int), ytf=np.zeros(4))
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 10, dtype=object).reshape(10, 1), y=y)
    a, out = str(tmp_path / "a.npz"), str(tmp_path / "o.h5")
    cases = [
        ({"x_key": "nope"}, "a.npz: no array 'nope' .*use --x/--y"),
        ({"x_test_key": "nope", "y_test_key": "yt"}, "no array 'nope' .*use --x-test/--y-test"),
        ({"y_key": "y9"}, "a.npz: x has 10 rows but y9 has 9"),
        ({"y_key": "yneg"}, "labels must be >= 0, found -1 in yneg"),
        ({"x_key": "s"}, "a.npz: s must be numeric"),
        ({"x_key": "x1"}, "x1 must be numeric .*2 or more dimensions"),
        ({"x_key": "x0", "y_key": "y0"}, "x0 has no rows"),
        ({"y_key": "yf"}, "targets must be finite, yf has nan"),
        ({"y_key": "y2"}, r"y2 must be integer labels \(N,\) or float targets"),
        ({"x_test_key": "xt", "y_test_key": "yt"}, r"test inputs xt have rows of shape \(5,\), train x \(3,\)"),
        ({"x_test_key": "x", "y_test_key": "yf"}, "test targets yf .* are not like the train targets y"),
        ({"x_test_key": "xt"}, "--x-test and --y-test go together"),
        ({"x_test_key": "x", "y_test_key": "y", "test_src": a}, "--test and --x-test/--y-test exclude each other"),
        ({"test_src": a, "test_fraction": 0.2}, "--test-fraction 0.2 and an official test split"),
        ({"test_fraction": 1.0}, r"--test-fraction must be in \[0, 1\)"),
        ({"scale": 0.0}, "--scale must be a finite number > 0, got 0.0"),
        ({"scale": -1.0}, "--scale must be a finite number > 0"),
        ({"scale": float("nan")}, "--scale must be a finite number > 0, got nan"),
        ({"test_src": str(tmp_path / "nope.npz")}, "nope.npz: no such file"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message) as e:
            prepare.convert(a, out, **kw)
        assert "\n" not in str(e.value)
    for src, message in [(str(tmp_path / "obj.npz"), "obj.npz: x must be numeric"), (str(tmp_path), "is a directory")]:
        with pytest.raises(UserError, match=message):
            prepare.convert(src, out)
    with pytest.raises(UserError, match="is an input file"):
        prepare.convert(a, a)
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.tmp").exists()  # the partial file is gone
