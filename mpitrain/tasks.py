"""What the targets are, and so the loss and the test metrics. No MPI here.

- classify: integer labels (N,); loss cross_entropy (or mse against one-hot labels);
  metric test_acc.
- regress: float targets (N,) or (N, k); loss mse (mean over the k outputs); metric test_mse.
- lm: token windows (N, L) -> next tokens (N, L); loss cross_entropy (mean over the L
  positions); metric test_ppl = exp(mean cross-entropy per token).

Every loss returns the batch's *sum* of per-sample losses, so sums over ranks are exact
means over a global batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .callables import resolve
from .comm import heartbeat
from .data.loader import to_device
from .errors import UserError
from .progress import bar

LOSSES = {"classify": ("cross_entropy", "mse"), "regress": ("mse",), "lm": ("cross_entropy",)}
WHAT = {"classify": "integer class labels", "regress": "float targets", "lm": "a token stream"}


def _cross_entropy(out, y):
    """Summed over samples; for sequences the mean over each sample's positions."""
    per_sample = y[0].numel() if len(y) else 1
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum") / per_sample


def _mse(out, y):
    """Summed over samples of the mean over outputs."""
    out = out.float().reshape(y.shape)
    return F.mse_loss(out, y, reduction="sum") / (y[0].numel() if len(y) else 1)


def _mse_one_hot(out, y):
    return F.mse_loss(out.float(), F.one_hot(y, out.shape[-1]).float(), reduction="sum") / out.shape[-1]


def build_loss(name: str, task: str = "classify", job_dir: str = ""):
    """loss(output, target) -> the batch's summed loss, for train.loss and the data's task."""
    if name == "auto":
        name = LOSSES[task][0]
    if name in ("cross_entropy", "mse"):
        if name not in LOSSES[task]:
            raise UserError(f"train.loss = {name!r} does not fit {WHAT[task]} (the data's targets); "
                            f"use {' or '.join(repr(n) for n in LOSSES[task])} or your own function")
        return {"cross_entropy": _cross_entropy, "mse": _mse_one_hot if task == "classify" else _mse}[name]
    fn = resolve(name, "train.loss", job_dir)

    def user_loss(out, y):
        if len(y) == 0:  # an empty last batch on some ranks: no loss, but keep the graph
            return out.sum() * 0.0
        v = fn(out, y)
        if not torch.is_tensor(v) or v.ndim > 1 or (v.ndim == 1 and len(v) != len(y)):
            raise UserError(f"train.loss = {name!r} returned {getattr(v, 'shape', type(v).__name__)}: "
                            f"expected per-sample losses ({len(y)},) or a scalar mean")
        return v.sum() if v.ndim == 1 else v * len(y)
    return user_loss


def check_model_and_loss(model, loss_fn, split, meta, device, factory: str, loss_name: str) -> None:
    """One forward of this rank's first (up to 2) training samples and the loss on it, as
    training will run them: the output must fit the data's task (classify: (B, >=
    num_classes) scores; lm: (B, L, >= vocab_size); regress: B x num_outputs values) and
    depend on the parameters, and the loss must be a scalar with a gradient to them (one
    small backward, through torch.autograd.grad: no .grad is touched).
    UserError naming the model factory or the loss otherwise. Runs in eval mode (no
    BatchNorm statistics change, no dropout); the same check on every rank."""
    n = len(split.x) if hasattr(split, "x") else (len(split.tokens) - 1) // split.seq_len
    if n <= 0:  # this rank holds no sample (the others check)
        return
    x, y = to_device(split.take(split.offset + np.arange(min(2, n))), device)
    b, was, where = len(y), model.training, f"model {factory!r}"
    model.eval()
    try:
        with torch.enable_grad():
            try:
                out = model(x)
            except Exception as e:  # noqa: BLE001 - the user's forward: one line with its message
                raise UserError(f"{where} fails on a batch of inputs of shape {tuple(x.shape)} "
                                f"({type(e).__name__}: {str(e)[:300]})") from None
            if not torch.is_tensor(out):
                raise UserError(f"{where} returns {type(out).__name__} from forward, expected a tensor")
            shape, want = tuple(out.shape), None
            if meta.task == "classify" and (out.ndim != 2 or shape[0] != b or shape[1] < meta.num_classes):
                want = f"({b}, {meta.num_classes}) class scores (num_classes = {meta.num_classes} from the data)"
            elif meta.task == "lm" and (shape[:-1] != tuple(y.shape) or shape[-1] < meta.vocab_size):
                want = f"{(*y.shape, meta.vocab_size)} token scores (vocab_size = {meta.vocab_size} from the data)"
            elif meta.task == "regress" and (out.ndim == 0 or shape[0] != b or out.numel() != y.numel()):
                want = f"{tuple(y.shape)} values (num_outputs = {meta.num_outputs} from the data)"
            if want is not None:
                raise UserError(f"{where} returns outputs of shape {shape} for a batch of {b} samples; "
                                f"expected {want}")
            if out.grad_fn is None:
                raise UserError(f"{where} returns outputs without a gradient (no grad_fn: detached, or computed "
                                "under torch.no_grad): training would not change its parameters")
            try:
                loss = loss_fn(out, y)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001
                raise UserError(f"train.loss = {loss_name!r} fails on outputs of shape {shape} and targets of "
                                f"shape {tuple(y.shape)} ({type(e).__name__}: {str(e)[:300]})") from None
            params = [p for p in model.parameters() if p.requires_grad]
            if not torch.is_tensor(loss) or loss.ndim != 0 or not loss.requires_grad or all(
                    g is None for g in torch.autograd.grad(loss, params, allow_unused=True)):
                raise UserError(f"train.loss = {loss_name!r} returns a loss without a gradient to the model's "
                                "parameters (detached, .item(), numpy, or computed under torch.no_grad): "
                                "training would not change the model")
    finally:
        model.train(was)


class Metric:
    """The task's test metric, independent of the training loss: `batch(out, y)` is a sum
    over the batch's samples; `row(sum / count)` the metrics row entry."""

    def __init__(self, task: str):
        self.task = task
        self.name = {"classify": "test_acc", "regress": "test_mse", "lm": "test_ppl"}[task]

    def batch(self, out, y) -> torch.Tensor:
        """The batch's sum, a 0-d tensor on the output's device (read once per evaluation)."""
        if self.task == "classify":
            return (out.argmax(-1) == y).sum()
        if self.task == "regress":
            return _mse(out, y)
        return _cross_entropy(out, y)

    def row(self, mean: float) -> float:
        return math.exp(min(mean, 700.0)) if self.task == "lm" else mean


@torch.no_grad()
def evaluate(model, loss_fn, metric, split, world, device, batch_size: int = 256, stages=None,
             classes: int = 0, progress: bool = False) -> dict:
    """Collective: test loss and the task's metric (test_acc, test_mse or test_ppl) over the
    whole split, in fp32; each rank evaluates its shard (a pipeline, `stages`: each replica
    its shard, through the pipeline; the last stage counts). `classes` > 0 (classification):
    also "confusion", the (true, predicted) counts over the whole split."""
    model.eval()
    lo, hi = (world if stages is None else stages.data).shard(split.total)
    pipe = getattr(stages, "pipe", None)  # (a pipeline; else a tensor split, whose loss is collective)
    last = stages is None or (pipe.last if pipe is not None else stages.counts)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, metric: read once at the end
    pairs = torch.zeros(classes * classes, dtype=torch.float64, device=device)
    for a in bar(range(lo, hi, batch_size), desc="evaluation", unit="batch", show=progress and world.is_root):
        x, y = to_device(split.take(np.arange(a, min(a + batch_size, hi))), device)
        heartbeat.tick()
        out = model(x) if pipe is None else pipe.forward(x if pipe.first else None)
        if stages is not None and pipe is None:  # tensor split (the gpt): every rank of it takes part
            value = loss_fn(out, y).double()
            if last:
                sums += torch.stack([value, value])  # (its metric is the loss: test_ppl)
        elif last:
            sums += torch.stack([loss_fn(out, y).double(), metric.batch(out, y).double()])
            if classes:
                pairs += torch.bincount(y * classes + out.argmax(-1), minlength=classes * classes).double()
    total = world.sum(np.concatenate([sums.cpu().numpy(), [hi - lo if last else 0], pairs.cpu().numpy()]))
    loss, value, count = total[:3]
    model.train()
    row = {"test_loss": loss / count, metric.name: metric.row(value / count)}
    if classes:
        row["confusion"] = total[3:].reshape(classes, classes).astype(np.int64)
    return row
