"""After training: the model out of a checkpoint, as a safetensors file any torch program
loads (`mpitrain export`, `mpitrain.load_model`), and text from a language model
(`mpitrain sample`). Not collective: one process, no MPI.

A checkpoint records how its model was built: the factory ("package.module:function", the
built-ins' included), its keyword arguments from the job, and what the data said (input
shape, classes or vocabulary: /meta `data`). The export writes the model's tensors (each
shared tensor once: the gpt's tied embedding and head) with that recipe as metadata:

    mpitrain_factory   "mpitrain.models.gpt:gpt"
    mpitrain_kwargs    {"input_shape": [64], "vocab_size": 65, "n_layer": 4, ...} (JSON)
    mpitrain_job_dir   the job file's folder (where a user's factory is imported from first)
    mpitrain_data      the data's description (JSON: task, vocabulary for sampling)

so `mpitrain.load_model(path)` — or three lines of plain torch — rebuilds it.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, files
from .callables import resolve
from .errors import UserError

MAX_TOKENS = 1_000_000


def _checkpoint(src: str) -> Path:
    """A checkpoint file, or the newest one that verifies in a run folder."""
    p = Path(src)
    if p.is_dir():
        found = checkpoint.newest_valid(p)
        if found is None:
            raise UserError(f"{p}: no valid checkpoint in this run folder")
        return found[0]
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint or run folder")
    return p


def recipe(path: Path, tree: dict) -> tuple[str, dict, str, dict]:
    """(factory, keyword arguments, job folder, data description) that rebuild the
    checkpoint's model; UserError naming what is missing."""
    from . import config
    from .data.hdf5 import Meta
    from .models import BUILTIN

    meta = tree["meta"]
    try:
        raw = tomllib.loads(meta.get("config") or "")
        cfg = config.from_dict(raw, f"{path} (its config)") if raw else None
    except (tomllib.TOMLDecodeError, UserError) as e:
        raise UserError(f"{path}: its recorded job config does not read ({str(e)[:160]})") from None
    data = meta.get("data")
    if cfg is None or not data:
        raise UserError(f"{path}: it does not record how to rebuild its model (written by the Python API, or by "
                        "an mpitrain before 0.x recorded the data's shape): export needs a checkpoint of "
                        "`mpitrain train`")
    d = json.loads(data)
    d["input_shape"] = tuple(d["input_shape"])
    m = cfg.model
    if m.factory:
        spec, kwargs = m.factory, dict(m.args)
    else:
        spec, fields = BUILTIN[m.name]
        kwargs = {f: getattr(m, f) for f in fields} | dict(m.args)
    kwargs = Meta(**d).factory_kwargs() | {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    kwargs["input_shape"] = list(kwargs["input_shape"])
    return spec, kwargs, meta.get("job_dir", ""), d


def build(spec: str, kwargs: dict, job_dir: str = "") -> torch.nn.Module:
    fn = resolve(spec, "model factory", job_dir)
    kwargs = dict(kwargs)
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    try:
        model = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the factory is the user's code
        raise UserError(f"model factory {spec!r} failed with {sorted(kwargs)} ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def from_checkpoint(src: str) -> tuple[torch.nn.Module, dict, Path]:
    """The trained model of a checkpoint (or a run folder's newest), in eval mode, with its
    data description and the checkpoint's path."""
    from .state import load_model

    path = _checkpoint(src)
    tree = checkpoint.read(path, isolated=True, lazy=True)
    spec, kwargs, job_dir, data = recipe(path, tree)
    model = build(spec, kwargs, job_dir)
    load_model(model, tree["model"], spec)
    return model.eval(), data | {"_recipe": (spec, kwargs, job_dir), "_step": tree["position"]["step"]}, path


def export(src: str, out: str, force: bool = False) -> str:
    """`mpitrain export`: the model of a checkpoint (or a run folder's newest) as a
    safetensors file with its recipe; refuses to replace a file without `force`."""
    from safetensors.torch import save_model

    dest = Path(out)
    if dest.exists() and not force:
        raise UserError(f"{dest}: exists (--force to replace it)")
    if dest.is_dir():
        raise UserError(f"{dest}: is a folder; give a file name (e.g. model.safetensors)")
    model, data, path = from_checkpoint(src)
    spec, kwargs, job_dir = data.pop("_recipe")
    step = data.pop("_step")
    meta = {"mpitrain_factory": spec, "mpitrain_kwargs": json.dumps(kwargs), "mpitrain_job_dir": job_dir,
            "mpitrain_data": json.dumps(data), "mpitrain_checkpoint": str(path), "mpitrain_step": str(step)}
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        save_model(model, str(tmp), metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{dest}: cannot write it ({e.strerror or e})") from None
    n = sum(p.numel() for p in model.parameters())
    return f"{dest}: {n:,} parameters of {spec} from {path.name} (step {step})"


def load_model(path: str) -> torch.nn.Module:
    """A model exported by `mpitrain export`, rebuilt by its factory and loaded, in eval
    mode. Python API; no MPI needed."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model as load

    p = Path(path)
    with files.reading(p, "no such model file"):
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{p}: not a safetensors file ({str(e)[:120]})") from None
    if "mpitrain_factory" not in meta:
        raise UserError(f"{p}: no mpitrain_factory in its metadata (not written by `mpitrain export`)")
    model = build(meta["mpitrain_factory"], json.loads(meta["mpitrain_kwargs"]), meta.get("mpitrain_job_dir", ""))
    try:
        load(model, str(p))
    except (RuntimeError, SafetensorError) as e:
        raise UserError(f"{p}: its tensors do not fit {meta['mpitrain_factory']} ({str(e).splitlines()[0][:160]})") \
            from None
    return model.eval()


# -- sampling ------------------------------------------------------------------------------

def _codec(data: dict, where: Path):
    """(encode, decode) of the checkpoint's token stream: char level (its vocabulary) or
    byte level (UTF-8 bytes)."""
    if data.get("task") != "lm":
        raise UserError(f"{where}: sampling needs a language model (a token-stream job); this one's task is "
                        f"{data.get('task')!r}")
    if data.get("level") == "char" and data.get("vocab"):
        vocab = data["vocab"]
        index = {c: i for i, c in enumerate(vocab)}

        def encode(text: str) -> list[int]:
            bad = sorted({c for c in text if c not in index})
            if bad:
                raise UserError(f"--prompt: {len(bad)} character(s) outside the model's vocabulary of {len(vocab)}: "
                                f"{''.join(bad[:10])!r}")
            return [index[c] for c in text]
        return encode, lambda ids: "".join(vocab[i] for i in ids)
    if data.get("level") == "byte":
        return (lambda text: list(text.encode())), (lambda ids: bytes(ids).decode(errors="replace"))
    raise UserError(f"{where}: the data's vocabulary was not recorded (a token file not made by "
                    "`mpitrain data text`): cannot turn text into tokens")


@torch.no_grad()
def sample(src: str, prompt: str = "", tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
           seed: int = 0) -> str:
    """`mpitrain sample`: the prompt and `tokens` tokens the model continues it with,
    drawn at `temperature` from the `top_k` most likely (0: all), deterministic for `seed`."""
    if not 0 <= tokens <= MAX_TOKENS:
        raise UserError(f"--tokens = {tokens}: expected 0..{MAX_TOKENS:,}")
    if not temperature > 0 or not np.isfinite(temperature):
        raise UserError(f"--temperature = {temperature}: expected a number > 0")
    if top_k < 0:
        raise UserError(f"--top-k = {top_k}: expected >= 0 (0: all tokens)")
    model, data, path = from_checkpoint(src)
    encode, decode = _codec(data, path)
    start = encode(prompt) if prompt else encode("\n") if data.get("level") == "byte" or "\n" in data.get(
        "vocab", "") else [0]
    window = int(getattr(model, "block_size", 0) or data["input_shape"][0])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([start], dtype=torch.long)
    for _ in range(tokens):
        logits = model(idx[:, -window:])[:, -1, :].double() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, nxt], 1)
    ids = idx[0].tolist()
    return (prompt if prompt else "") + decode(ids[len(start):])
