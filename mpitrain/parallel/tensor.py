"""Tensor (weight-matrix) parallelism, Megatron-LM style: layers whose weights are split
over the T ranks of a tensor-parallel World `tp`, each rank holding 1/T of every matrix.

    f = copy_to_tp      forward: identity            backward: SUM allreduce of the gradient
    g = reduce_from_tp  forward: SUM allreduce       backward: identity
    gather_from_tp      forward: allgather, last dim backward: this rank's slice
    scatter_to_tp       forward: this rank's slice   backward: allgather, last dim

    ColumnParallelLinear  weight rows (output features) split:   f -> x W_r^T + b_r [-> gather]
    RowParallelLinear     weight columns (input features) split: [scatter ->] x_r W_r^T -> g -> + b
    VocabParallelEmbedding  rows split by vocabulary range: ids outside the range give zeros -> g
    vocab_parallel_cross_entropy  the loss over logits split by vocabulary, never gathered

A Column layer (gather_output=False) followed by a Row layer (input_is_parallel=True)
communicates once forward (g) and once backward (f): the MLP of a transformer block.

Every rank of `tp` must call each layer and operator in the same order (they are
collective) with inputs of the same shape; Column/Row inputs that are not split are the
same on every rank of `tp` (a replicated activation), which the gradients assume.

Initialisation: a layer builds the *full* weight on the CPU on every rank alike and keeps
its slice, so a split model starts equal to the unsplit one: with torch's default
nn.Linear / nn.Embedding initialisation drawn from `generator` (a torch.Generator or an
int seed, the same on every rank), else from torch's global CPU generator (then seed it
alike on every rank: `torch.manual_seed(s)` before ColumnParallelLinear(...) draws exactly
the weights `torch.manual_seed(s)` before nn.Linear(...) draws), or filled by `init(w)`
(your function of the full weight; the bias then starts at zero). `from_linear` /
`from_embedding` slice an existing module instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.tp import allreduce_max_
from ..errors import UserError

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "CopyToTensorParallel", "ReduceFromTensorParallel", "GatherFromTensorParallel", "ScatterToTensorParallel",
           "VocabParallelCrossEntropy", "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
           "tp_sizes"]


# -- sizes ---------------------------------------------------------------------------------------

def tp_sizes(n: int, parts: int, what: str = "size") -> list[int]:
    """n split into `parts` equal parts (one per tensor-parallel rank), or a one-line
    UserError naming `what`, n and parts when parts does not divide n."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise UserError(f"the tensor-parallel size must be a positive integer, not {parts!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"{what} must be a non-negative integer, not {n!r}")
    if n % parts:
        raise UserError(f"{what} = {n} is not divisible by the {parts} tensor-parallel ranks")
    return [n // parts] * parts


def _bounds(n: int, tp, what: str) -> tuple[int, int]:
    """[lo, hi) of this rank's part of n over tp (UserError where tp.size does not divide n)."""
    part = tp_sizes(n, tp.size, what)[0]
    return tp.rank * part, (tp.rank + 1) * part


def _mpi_in_backward(tp, t: torch.Tensor) -> None:
    """A CUDA graph's backward runs on autograd's device thread: MPI must allow calls from
    any thread there (mpi4py asks for MPI_THREAD_MULTIPLE by default)."""
    if t.is_cuda and not tp.thread_multiple:
        raise RuntimeError("tensor-parallel backward on CUDA calls MPI from autograd's device thread: "
                           "initialise MPI with MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level = 'multiple')")


# -- the conjugate operators -----------------------------------------------------------------------

class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward; the gradient is summed over tp backward (every rank's part of
    the model used the same input)."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _mpi_in_backward(ctx.tp, grad)
        out = grad.clone(memory_format=torch.contiguous_format)
        return ctx.tp.allreduce_(out), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: the partial results are summed over tp forward; identity backward."""

    @staticmethod
    def forward(ctx, x, tp):
        out = x.clone(memory_format=torch.contiguous_format)
        return tp.allreduce_(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """Forward: every rank's tensor concatenated along the last dim (rank order);
    backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp, ctx.n = tp, x.shape[-1]
        parts = tp.allgather_tensor(x)  # (T, *x.shape)
        return torch.cat(parts.unbind(0), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        lo = ctx.tp.rank * ctx.n
        return grad[..., lo:lo + ctx.n], None


class ScatterToTensorParallel(torch.autograd.Function):
    """Forward: this rank's slice of the last dim; backward: the gradient's slices
    allgathered along the last dim."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        lo, hi = _bounds(x.shape[-1], tp, "the last dimension of the input")
        return x[..., lo:hi].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        _mpi_in_backward(ctx.tp, grad)
        parts = ctx.tp.allgather_tensor(grad)
        return torch.cat(parts.unbind(0), dim=-1), None


def copy_to_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """f (collective in backward): identity forward, SUM allreduce of the gradient backward."""
    return x if tp.size == 1 else CopyToTensorParallel.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """g (collective in forward): SUM allreduce forward, identity backward."""
    return x if tp.size == 1 else ReduceFromTensorParallel.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """Collective in forward: the ranks' tensors concatenated along the last dim; backward
    takes this rank's slice."""
    return x if tp.size == 1 else GatherFromTensorParallel.apply(x, tp)


def scatter_to_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """Collective in backward: this rank's slice of the last dim; backward allgathers."""
    return x if tp.size == 1 else ScatterToTensorParallel.apply(x, tp)


# -- initialisation --------------------------------------------------------------------------------

def _generator(generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise UserError(f"generator must be a torch.Generator, an int seed or None, not {type(generator).__name__}")


def _full_linear(in_features: int, out_features: int, bias: bool, dtype, init, generator):
    """The full (weight, bias) on the CPU: init(weight) and a zero bias, or nn.Linear's own
    reset_parameters drawn from `generator` (None: torch's global generator, as nn.Linear)."""
    w = torch.empty(out_features, in_features, dtype=dtype)
    b = torch.empty(out_features, dtype=dtype) if bias else None
    with torch.no_grad():
        if init is not None:
            init(w)
            if b is not None:
                b.zero_()
        else:
            g = _generator(generator)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            if b is not None:
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
                nn.init.uniform_(b, -bound, bound, generator=g)
    return w, b


def _keep(t: torch.Tensor, device) -> nn.Parameter:
    """A parameter of its own (not a view keeping the full tensor alive) on `device`."""
    return nn.Parameter(t.clone(memory_format=torch.contiguous_format).to(device))


# -- layers ------------------------------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split over tp: this rank holds
    weight (out_features / T, in_features) and bias (out_features / T).

    Input: the full x, the same on every rank of tp. Output: this rank's slice of y's last
    dim, or (gather_output=True) the full y. Communication: backward, one SUM allreduce of
    the input gradient (f); with gather_output, forward allgathers the output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False, *,
                 tp, init=None, generator=None, device=None, dtype=None):
        super().__init__()
        lo, hi = _bounds(out_features, tp, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank, self.gather_output, self.tp = hi - lo, gather_output, tp
        w, b = _full_linear(in_features, out_features, bias, dtype, init, generator)
        self.weight = _keep(w[lo:hi], device)
        self.weight.tp_dim = 0  # the dim split over tp (a replicated parameter has none)
        if b is None:
            self.register_parameter("bias", None)
        else:
            self.bias = _keep(b[lo:hi], device)
            self.bias.tp_dim = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, tp, gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's rows of an existing nn.Linear (same device and dtype)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, tp=tp,
                    init=lambda full: full.copy_(w), device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            lo = tp.rank * layer.out_per_rank
            with torch.no_grad():
                layer.bias.copy_(linear.bias[lo:lo + layer.out_per_rank])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)
        return gather_from_tp(y, self.tp) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_per_rank} on rank {self.tp.rank} of {self.tp.size}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split over tp: this rank holds
    weight (out_features, in_features / T); the bias (out_features) is whole on every rank
    and added once, after the reduction.

    Input: this rank's slice of x's last dim (input_is_parallel=True, e.g. a
    ColumnParallelLinear's output), or the full x, sliced here. Output: the full y on every
    rank. Communication: forward, one SUM allreduce of the output (g); backward, with
    input_is_parallel=False, an allgather of the input gradient.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True, *,
                 tp, init=None, generator=None, device=None, dtype=None):
        super().__init__()
        lo, hi = _bounds(in_features, tp, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank, self.input_is_parallel, self.tp = hi - lo, input_is_parallel, tp
        w, b = _full_linear(in_features, out_features, bias, dtype, init, generator)
        self.weight = _keep(w[:, lo:hi], device)
        self.weight.tp_dim = 1
        if b is None:
            self.register_parameter("bias", None)
        else:
            self.bias = _keep(b, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, tp, input_is_parallel: bool = True) -> "RowParallelLinear":
        """This rank's columns of an existing nn.Linear (same device and dtype)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel, tp=tp,
                    init=lambda full: full.copy_(w), device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = self.in_per_rank if self.input_is_parallel else self.in_features
        if x.shape[-1] != want:
            hint = (" (the full input: pass input_is_parallel=False)"
                    if self.input_is_parallel and x.shape[-1] == self.in_features else "")
            raise ValueError(f"RowParallelLinear expects inputs with last dim {want}, not {x.shape[-1]}{hint}")
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp)
        y = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} on rank {self.tp.rank} of {self.tp.size}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows split by vocabulary range over tp: this rank holds ids
    [rank * V / T, (rank + 1) * V / T). Ids outside the range give zeros here; the SUM
    allreduce of the output (g, forward) fills them in. Output: the full embedding on every
    rank. `padding_idx` as nn.Embedding: no gradient, and a zero row at the default init."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, tp, init=None,
                 generator=None, device=None, dtype=None):
        super().__init__()
        lo, hi = _bounds(num_embeddings, tp, "num_embeddings")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise UserError(f"padding_idx = {padding_idx} must be within num_embeddings = {num_embeddings}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.vocab_start, self.vocab_end, self.tp = lo, hi, tp
        self._local_padding = padding_idx - lo if padding_idx is not None and lo <= padding_idx < hi else None
        w = torch.empty(num_embeddings, embedding_dim, dtype=dtype)
        with torch.no_grad():
            if init is not None:
                init(w)
            else:  # nn.Embedding's reset_parameters
                nn.init.normal_(w, generator=_generator(generator))
                if padding_idx is not None:
                    w[padding_idx].zero_()
        self.weight = _keep(w[lo:hi], device)
        self.weight.tp_dim = 0

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, tp) -> "VocabParallelEmbedding":
        """This rank's vocabulary rows of an existing nn.Embedding (same device and dtype;
        max_norm, scale_grad_by_freq and sparse are not supported)."""
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise UserError("VocabParallelEmbedding.from_embedding: max_norm, scale_grad_by_freq and sparse "
                            "are not supported")
        w = embedding.weight.detach()
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, tp=tp,
                   init=lambda full: full.copy_(w), device=w.device, dtype=w.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_embeddings:
                raise IndexError(f"id {low if low < 0 else high} is out of range for num_embeddings = "
                                 f"{self.num_embeddings}")
        if self.tp.size == 1:
            return F.embedding(ids, self.weight, self._local_padding)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self._local_padding).masked_fill(outside.unsqueeze(-1), 0)
        return reduce_from_tp(out, self.tp)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (ids {self.vocab_start}-{self.vocab_end - 1} on rank "
                f"{self.tp.rank} of {self.tp.size})" + (f", padding_idx={self.padding_idx}"
                                                        if self.padding_idx is not None else ""))


# -- the loss ------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits split by vocabulary along the last dim (this rank: ids
    [rank * n, (rank + 1) * n) of a vocabulary of n * T). Forward: a MAX allreduce of each
    row's largest logit (for a stable exp), then one SUM allreduce of two values per row
    (its sum of exp, and the target's logit from the rank that holds it). Backward, no
    communication: (softmax - one_hot(target)) on the shard, times the incoming gradient."""

    @staticmethod
    def forward(ctx, logits, target, tp, reduction, ignore_index):
        n = logits.shape[-1]
        lo = tp.rank * n
        work = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        top = work.amax(dim=-1).contiguous()
        if tp.size > 1:
            allreduce_max_(tp, top)
        shifted = work - top.unsqueeze(-1)
        valid = target != ignore_index
        here = valid & (target >= lo) & (target < lo + n)
        idx = torch.where(here, target - lo, 0)
        picked = torch.where(here, shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0)
        exp = shifted.exp_()
        both = torch.stack([exp.sum(dim=-1), picked])
        if tp.size > 1:
            tp.allreduce_(both)
        sum_exp, target_logit = both[0], both[1]
        loss = torch.where(valid, sum_exp.log() - target_logit, 0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        count = valid.sum()
        ctx.save_for_backward(softmax, idx, here, valid, count)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        if reduction == "mean":
            loss = loss.sum() / count
        elif reduction == "sum":
            loss = loss.sum()
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, here, valid, count = ctx.saved_tensors
        grad = grad.to(softmax.dtype)
        if ctx.reduction == "mean":
            grad = grad / count
        scale = torch.where(valid, grad.expand(valid.shape), 0)  # a scalar for mean/sum, per row for none
        out = softmax * scale.unsqueeze(-1)
        out.scatter_add_(-1, idx.unsqueeze(-1), torch.where(here, -scale, 0).unsqueeze(-1))
        return out.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, tp, *, reduction: str = "mean",
                                 ignore_index: int = -100) -> torch.Tensor:
    """Collective over tp: F.cross_entropy(full_logits, target) with the vocabulary (the
    last dim) split over tp, rank r holding ids [r * n, (r + 1) * n) (n = logits_shard's
    last dim, e.g. a ColumnParallelLinear head's output); the full logits are never
    gathered. logits_shard (..., n), target (...) of class ids, the same on every rank of
    tp. reduction "mean" (over the targets that are not ignore_index), "sum" or "none";
    computed in float32 at least, returned in the logits' dtype."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, not {reduction!r}")
    if logits_shard.dim() < 1 or tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits_shard.shape)} (the target has every dim but the last, the vocabulary)")
    vocab = logits_shard.shape[-1] * tp.size
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        raise IndexError(f"target {int(target[bad][0])} is out of range for the vocabulary of {vocab}")
    return VocabParallelCrossEntropy.apply(logits_shard, target, tp, reduction, ignore_index)
