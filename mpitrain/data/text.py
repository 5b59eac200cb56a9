"""`mpitrain data text`: a text file -> a token stream (characters or bytes) in HDF5.

Layout: datasets `train/tokens` and `test/tokens` (1-D; uint8 when vocab_size <= 256,
uint16 when <= 65536, else int32) and file attributes `vocab_size`, `level` ("char" or
"byte"), `vocab` (char level only: the sorted distinct characters; a token is an index into
it), `source` and `description`. The split is nanoGPT's shakespeare_char one: the first
int(n * (1 - f)) tokens train, the rest test; f = 0 writes no test group.

The file is read in chunks, so memory does not grow with it: char level reads it twice (the
vocabulary and the token count, then the tokens), decoding UTF-8 incrementally so a
character split across two chunks is read whole. Tokens are the exact characters (no
newline translation), so decoding them gives back the file.
"""

from __future__ import annotations

import codecs
import itertools
from pathlib import Path

import numpy as np

from .. import files
from ..errors import UserError
from ..progress import bar
from .write import _attrs, serial_file

CHUNK = 16 << 20  # bytes read at a time
PIECE = 1 << 20  # characters encoded at a time
LEVELS = ("char", "byte")


def prepare(src: str, out: str, level: str = "char", test_fraction: float = 0.1, chunk_size: int = CHUNK) -> str:
    """Tokenize `src` into `out` (see the module's layout); returns the one-line summary."""
    if level not in LEVELS:
        raise UserError(f"--level must be 'char' or 'byte', got {level!r}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    path = _source(src, out)
    if level == "char":
        n, vocab = _scan(path, chunk_size)
        if "\0" in vocab:
            raise UserError(f"{src}: contains NUL characters, which an HDF5 string attribute cannot hold; "
                            "use --level byte")
        vocab_size = len(vocab)
    else:
        n, vocab, vocab_size = path.stat().st_size, None, 256
    n_train = int(n * (1 - test_fraction))
    n_test = n - n_train
    if test_fraction > 0 and min(n_train, n_test) < 2:
        raise UserError(f"{src}: {n} tokens split as train {n_train}, test {n_test}; with --test-fraction "
                        f"{test_fraction} both need at least 2 (use a bigger file, or --test-fraction 0)")
    dtype = np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32
    with serial_file(out) as f:
        f.attrs["vocab_size"] = int(vocab_size)
        f.attrs["level"] = level
        if vocab is not None:
            f.attrs["vocab"] = vocab
        _attrs(f, None, f"text file {path.name}",
               f"{level}-level token stream, {vocab_size} symbols; split: the first {n_train} tokens train, "
               f"the last {n_test} test (test_fraction={test_fraction})")
        parts = [(f.create_dataset("train/tokens", shape=(n_train,), dtype=dtype), 0, n_train)]
        if test_fraction > 0:
            parts.append((f.create_dataset("test/tokens", shape=(n_test,), dtype=dtype), n_train, n))
        tokens = _chars(path, chunk_size, vocab, dtype) if vocab is not None else _bytes(path, chunk_size)
        pos = 0
        for t in bar(tokens, desc=f"{path.name} -> tokens", unit="chunk"):
            end = pos + len(t)
            if end > n:
                raise UserError(f"{src}: changed while it was being read; run again")
            for ds, lo, hi in parts:  # the part of [pos, end) that falls in [lo, hi)
                a, b = max(pos, lo), min(end, hi)
                if a < b:
                    ds[a - lo:b - lo] = t[a - pos:b - pos]
            pos = end
        if pos != n:
            raise UserError(f"{src}: changed while it was being read; run again")
    return f"{out}: train {n_train}, test {n_test} tokens, vocab {vocab_size} ({level})"


def _source(src: str, out: str) -> Path:
    """The input as a Path: a non-empty regular file that is not the output."""
    path = Path(src)
    with files.reading(src):
        st = path.stat()
    if path.is_dir():
        raise UserError(f"{src}: is a directory, not a text file")
    if not path.is_file():
        raise UserError(f"{src}: not a regular file")
    if st.st_size == 0:
        raise UserError(f"{src}: empty file, no tokens")
    if Path(out).resolve() == path.resolve():
        raise UserError(f"{out}: is the input file; choose another --out")
    return path


def _chunks(path: Path, size: int):
    """The file's bytes, `size` at a time (a read error is a UserError)."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(size):
                yield chunk
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def _decoded(path: Path, size: int):
    """The file as str pieces, decoded as UTF-8 across chunk boundaries; an invalid byte is
    a UserError with its offset in the file."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    pos = 0  # bytes handed to the decoder so far
    for chunk in itertools.chain(_chunks(path, size), [b""]):  # b"": the end, final=True
        pending = len(dec.getstate()[0])  # bytes of an unfinished character kept from before
        try:
            text = dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 at byte {pos - pending + e.start} ({e.reason}); "
                            "use --level byte for raw bytes") from None
        pos += len(chunk)
        if text:
            yield text


def _scan(path: Path, size: int) -> tuple[int, str]:
    """First pass: the number of characters and the sorted distinct characters."""
    chars: set[str] = set()
    n = 0
    for text in _decoded(path, size):
        chars.update(text)
        n += len(text)
    return n, "".join(sorted(chars))


def _chars(path: Path, size: int, vocab: str, dtype):
    """Second pass: token ids (indices into `vocab`) per chunk, via a code point table."""
    points = np.array([ord(c) for c in vocab], dtype=np.int64)
    table = np.full(points[-1] + 2, -1, dtype=np.int32)  # the last entry: any code point above
    table[points] = np.arange(len(vocab), dtype=np.int32)
    for chunk in _decoded(path, size):
        for i in range(0, len(chunk), PIECE):  # pieces: the lookup's index and id arrays stay small
            text = chunk[i:i + PIECE]
            cp = np.frombuffer(text.encode("ascii"), np.uint8) if text.isascii() else np.frombuffer(
                text.encode("utf-32-le"), "<u4")
            ids = table.take(cp, mode="clip")  # code points above the table's end: its last entry
            if (ids < 0).any():  # a character the first pass did not see
                raise UserError(f"{path}: changed while it was being read; run again")
            yield ids.astype(dtype)


def _bytes(path: Path, size: int):
    for chunk in _chunks(path, size):
        yield np.frombuffer(chunk, dtype=np.uint8)
