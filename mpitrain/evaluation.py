"""`mpitrain evaluate RUN_OR_CKPT [--data FILE] [--split test]`: a checkpoint's model on a
split of its data (or another file with the same inputs and vocabulary), at any world
size; the task's figures under the names metrics.jsonl uses (test_loss, test_acc,
test_mse, test_ppl), and for classification a per-class table and a confusion-matrix PNG.
Collective: every rank evaluates its shard (tasks.evaluate, the code training uses)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np

from . import export, state
from .errors import UserError


def _job(tree: dict, path: Path, data: str, split: str):
    """The checkpoint's job config with its data reading `split` of `data` (partitioned:
    each rank reads only its shard)."""
    from . import config

    cfg = config.from_dict(tomllib.loads(tree["meta"].get("config") or ""), f"{path} (its config)")
    d = dataclasses.replace(cfg.data, path=data or cfg.data.path, train=split, test="", mode="partitioned",
                            shuffle="shard", assign="static")
    return cfg, d


def _same_data(theirs: dict, meta, where: str) -> None:
    mine = dataclasses.asdict(meta)
    mine["input_shape"] = list(mine["input_shape"])
    theirs = dict(theirs, input_shape=list(theirs.get("input_shape", [])))
    for key in ("task", "input_shape", "num_classes", "num_outputs", "vocab_size", "vocab"):
        if key in theirs and theirs[key] != mine.get(key):
            a, b = theirs[key], mine.get(key)
            show = (lambda v: f"{len(v)} symbols" if isinstance(v, str) and len(v) > 20 else repr(v))
            raise UserError(f"{where}: its {key} is {show(b)}, the checkpoint's model was trained on {show(a)}")


def run(args, world, log) -> None:
    from .data import hdf5
    from .tasks import Metric, build_loss, evaluate

    if args.png and Path(args.png).exists() and not args.force:
        raise UserError(f"--png {args.png}: exists (--force to replace it)")
    path = Path(world.on_root(lambda: str(export._checkpoint(args.source))))
    tree = state.load(path, world)

    def setup():
        spec, kwargs, job_dir, data = export.recipe(path, tree)
        cfg, dcfg = _job(tree, path, args.data, args.split)
        return spec, kwargs, job_dir, data, cfg, dcfg
    spec, kwargs, job_dir, data, cfg, dcfg = world.agree(setup)
    split, _, meta = hdf5.load(dcfg, world)
    world.agree(_same_data, data, meta, f"{dcfg.path} ({args.split})")
    device = world.select_device("auto" if cfg.train.device == "auto" else cfg.train.device)

    def build():
        model = export.build(spec, kwargs, job_dir)
        state.load_model(model, tree["model"], spec)
        return model.to(device), build_loss(cfg.train.loss, meta.task, job_dir)
    model, loss = world.agree(build)
    metric = Metric(meta.task)
    classes = meta.num_classes if meta.task == "classify" else 0
    row = evaluate(model, loss, metric, split, world, device, classes=classes, progress=True)
    if not world.is_root:
        return
    confusion = row.pop("confusion", None)
    step = tree["position"]["step"]
    print(json.dumps({"checkpoint": str(path), "step": step, "split": args.split, "samples": split.total} | row))
    if confusion is not None:
        print(_table(confusion))
        if args.png:
            _plot(confusion, Path(args.png), f"{path.parent.name}/{path.name} (step {step}), {args.split}")
            print(f"confusion matrix: {args.png}")


def _table(confusion: np.ndarray) -> str:
    """Per class: samples, recall (accuracy within the class), precision."""
    lines = [f"{'class':>5} {'samples':>8} {'recall':>7} {'precision':>9}"]
    for c in range(len(confusion)):
        n, hit, said = confusion[c].sum(), confusion[c, c], confusion[:, c].sum()
        lines.append(f"{c:>5} {n:>8} {hit / n if n else float('nan'):>7.4f} "
                     f"{hit / said if said else float('nan'):>9.4f}")
    return "\n".join(lines)


def _plot(confusion: np.ndarray, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(confusion)
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * k, 1.2 + 0.45 * k))
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(k), yticks=range(k), title=title)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UserError(f"--png {out}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
