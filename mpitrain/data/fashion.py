"""Fashion-MNIST (Zalando, MIT licence) from the four upstream IDX files, as installed by
Debian/Ubuntu's package `dataset-fashion-mnist` under /usr/share/datasets/fashion-mnist.

The official split is kept (60,000 train / 10,000 test). Pixels are stored as uint8 with a
`scale` attribute (1/255) that the loader applies: a quarter of float32's size on disk.
Checked: each file's decompressed sha256. Debian re-wrote the gzip headers (no file name, a
new mtime), so the .gz files' MD5s differ from upstream's, but the decompressed bytes are
upstream's: the sums below were measured on Debian 12's package 0.0~git20200523.55506a9-1.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from .write import write_serial

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {  # name: (sha256 of the decompressed bytes, IDX magic, shape after the header)
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 2051,
                                (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 2049, (60000,)),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 2051,
                               (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 2049, (10000,)),
}
INSTALL = ("install Debian/Ubuntu's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
           "or pass --from DIR with the four upstream files")


def _read(folder: Path, name: str) -> np.ndarray:
    digest, magic, shape = FILES[name]
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            break
    else:
        raise UserError(f"{folder}: no {name}(.gz): {INSTALL}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e}); {INSTALL}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise UserError(f"{path}: corrupt or not Fashion-MNIST (sha256 of its content {got[:16]}..., "
                        f"expected {digest[:16]}...); {INSTALL}")
    header = 4 * (1 + len(shape))
    dims = np.frombuffer(data[:header], dtype=">u4")
    assert dims[0] == magic and tuple(dims[1:]) == shape  # implied by the checksum
    return np.frombuffer(data[header:], dtype=np.uint8).reshape(shape)


def prepare(out: str, source: str = DEFAULT_DIR) -> str:
    """The four IDX files -> HDF5 (official split, uint8 pixels + scale)."""
    folder = Path(source)
    train = (_read(folder, "train-images-idx3-ubyte"), _read(folder, "train-labels-idx1-ubyte"))
    test = (_read(folder, "t10k-images-idx3-ubyte"), _read(folder, "t10k-labels-idx1-ubyte"))
    write_serial(out, {"train": train, "test": test}, len(CLASSES),
                 source=f"Fashion-MNIST (Zalando Research, MIT licence) from {folder}",
                 description="28x28 grey-scale images, uint8 (x * scale = [0, 1]); official 60k/10k split; "
                             "classes: " + ", ".join(CLASSES), x_dtype=np.uint8, x_scale=1 / 255)
    return f"{out}: train 60000, test 10000 samples, shape (28, 28), 10 classes (uint8, scale 1/255)"
