"""`mpitrain data text`: a text file -> a token stream (train/tokens, test/tokens; vocab_size,
level, vocab), split like nanoGPT's shakespeare_char (first 90 % train, last 10 % test).

Plain tests (every rank of an MPI run does the same in its own tmp_path)."""

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpitrain.data import text
from mpitrain.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data/shakespeare/tinyshakespeare.txt"  # bundled
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@pytest.fixture(scope="module")
def shakespeare() -> bytes:
    data = SHAKESPEARE.read_bytes()
    assert len(data) == 1_115_394 and hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256
    return data


def _read(path):
    with h5py.File(path, "r") as f:
        return dict(f.attrs), {k: f[k + "/tokens"][:] for k in ("train", "test") if k in f}


def test_shakespeare_char_level(shakespeare, tmp_path):
    msg = text.prepare(str(SHAKESPEARE), str(tmp_path / "s.h5"))
    assert msg == f"{tmp_path / 's.h5'}: train 1003854, test 111540 tokens, vocab 65 (char)"
    attrs, tokens = _read(tmp_path / "s.h5")
    assert attrs["vocab_size"] == 65 and attrs["level"] == "char" and "num_classes" not in attrs
    assert attrs["vocab"] == "".join(sorted(set(shakespeare.decode()))) and len(attrs["vocab"]) == 65
    assert "tinyshakespeare.txt" in attrs["source"] and attrs["description"]
    assert tokens["train"].dtype == np.uint8 and tokens["test"].dtype == np.uint8
    assert tokens["train"].shape == (1003854,) and len(tokens["train"]) + len(tokens["test"]) == len(shakespeare)
    vocab = np.array(list(attrs["vocab"]))
    assert "".join(vocab[np.concatenate([tokens["train"], tokens["test"]])]) == shakespeare.decode()


def test_byte_level_round_trips_bytes(shakespeare, tmp_path):
    msg = text.prepare(str(SHAKESPEARE), str(tmp_path / "b.h5"), level="byte", test_fraction=0.25)
    assert msg.endswith("vocab 256 (byte)")
    attrs, tokens = _read(tmp_path / "b.h5")
    assert attrs["vocab_size"] == 256 and attrs["level"] == "byte" and "vocab" not in attrs
    assert len(tokens["train"]) == int(len(shakespeare) * 0.75)
    assert np.concatenate([tokens["train"], tokens["test"]]).tobytes() == shakespeare


def test_small_chunks_split_utf8_sequences(tmp_path):
    src = tmp_path / "u.txt"
    src.write_text("héllo wörld ✓ 𝄞\n" * 50, encoding="utf-8")  # 2-, 3- and 4-byte characters
    text.prepare(str(src), str(tmp_path / "one.h5"))
    for chunk in (1, 2, 3, 5, 7):
        text.prepare(str(src), str(tmp_path / "small.h5"), chunk_size=chunk)
        with h5py.File(tmp_path / "one.h5", "r") as a, h5py.File(tmp_path / "small.h5", "r") as b:
            assert dict(a.attrs) == dict(b.attrs)
            for k in ("train/tokens", "test/tokens"):
                assert a[k].dtype == b[k].dtype and a[k][:].tobytes() == b[k][:].tobytes()
    attrs, tokens = _read(tmp_path / "one.h5")
    assert attrs["vocab"] == "".join(sorted(set(src.read_text(encoding="utf-8"))))
    vocab = np.array(list(attrs["vocab"]))
    assert "".join(vocab[np.concatenate([tokens["train"], tokens["test"]])]) == src.read_text(encoding="utf-8")


def test_no_test_split_and_wider_token_types(tmp_path):
    src = tmp_path / "wide.txt"
    src.write_text("".join(map(chr, range(0x4E00, 0x4E00 + 300))), encoding="utf-8")
    assert text.prepare(str(src), str(tmp_path / "w.h5"), test_fraction=0).endswith("train 300, test 0 tokens, "
                                                                                      "vocab 300 (char)")
    attrs, tokens = _read(tmp_path / "w.h5")
    assert list(tokens) == ["train"] and tokens["train"].dtype == np.uint16
    assert np.array_equal(tokens["train"], np.arange(300))
    src.write_text("".join(map(chr, range(0x20000, 0x20000 + 65537))), encoding="utf-8")
    text.prepare(str(src), str(tmp_path / "w.h5"))
    attrs, tokens = _read(tmp_path / "w.h5")
    assert attrs["vocab_size"] == 65537 and tokens["train"].dtype == np.int32


def test_bad_inputs_are_one_line_errors(tmp_path):
    out = str(tmp_path / "o.h5")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes("ok ✓ then".encode() + b"\xff\xfe rest")
    (tmp_path / "cut.txt").write_bytes("ends inside ✓".encode()[:-1])
    (tmp_path / "tiny.txt").write_bytes(b"abc")
    (tmp_path / "nul.txt").write_bytes(b"a\0b")
    cases = [
        (str(tmp_path / "nope.txt"), {}, "nope.txt: no such file"),
        (str(tmp_path), {}, "is a directory"),
        (str(tmp_path / "empty.txt"), {}, "empty.txt: empty file"),
        (str(tmp_path / "bad.txt"), {}, "bad.txt: not UTF-8 at byte 11 .*use --level byte"),
        (str(tmp_path / "bad.txt"), {"chunk_size": 4}, "bad.txt: not UTF-8 at byte 11 "),
        (str(tmp_path / "cut.txt"), {"chunk_size": 3}, "cut.txt: not UTF-8 at byte 12 "),
        (str(tmp_path / "tiny.txt"), {}, "3 tokens split as train 2, test 1; .*at least 2"),
        (str(tmp_path / "nul.txt"), {}, "nul.txt: contains NUL characters.*--level byte"),
        (str(tmp_path / "tiny.txt"), {"test_fraction": 1.0}, r"--test-fraction must be in \[0, 1\), got 1.0"),
        (str(tmp_path / "tiny.txt"), {"test_fraction": -0.1}, r"--test-fraction must be in \[0, 1\), got -0.1"),
        (str(tmp_path / "tiny.txt"), {"level": "word"}, "--level must be 'char' or 'byte'"),
    ]
    for src, kw, message in cases:
        with pytest.raises(UserError, match=message) as e:
            text.prepare(src, out, **kw)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.tmp").exists()
    with pytest.raises(UserError, match="is the input file"):
        text.prepare(str(tmp_path / "tiny.txt"), str(tmp_path / "tiny.txt"), test_fraction=0)
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        text.prepare(str(tmp_path / "bad.txt"), str(tmp_path / "afile" / "o.h5"), level="byte")
