"""The built-in GPT (mpitrain/models/gpt.py) split over the T ranks of a tensor-parallel
World `tp`, Megatron-LM style, built from an existing GPT by slicing its weights
(`TensorParallelGPT.from_gpt(gpt, tp=tp)`), so the split model starts equal to the unsplit
one and computes the same logits, loss and gradients.

What each rank holds (C = n_embd, H = n_head, V = vocab_size, rank r of T):

    wte          VocabParallelEmbedding: token ids [r V/T, (r+1) V/T)   -> g (SUM) forward
    wpe          whole (replicated)
    per block    ln_1, ln_2 whole;
                 attention: heads [r H/T, (r+1) H/T): their q, k and v rows of the gpt's fused
                   c_attn (rows [0, C) are q, [C, 2C) k, [2C, 3C) v, head h at h C/H within each),
                   kept as three column-parallel layers q, k, v that share one f; c_proj
                   row-parallel (its columns of those heads) -> g, bias whole
                 MLP: c_fc column-parallel (4C/T rows) -> GELU -> c_proj row-parallel -> g
    ln_f         whole
    lm_head      vocabulary-parallel: f -> logits for ids [r V/T, (r+1) V/T). The gpt ties it
                 to the embedding (one Parameter): here too, this rank's wte rows are the
                 head's rows. An untied gpt gets a head of its own, sliced the same way.
    loss         vocab_parallel_cross_entropy: the logits are never gathered.

Per block, forward communicates twice (g after attention, g after the MLP) and backward
twice (f before q/k/v, f before c_fc), plus g after the embedding and f before the head.
Every activation outside the attention heads and the MLP hidden layer is the same on every
rank of tp, so the replicated parameters (LayerNorms, wpe, the row layers' biases) get the
same gradient on every rank of tp (f sums the partial input gradients of the split layers
where they leave the parallel region): they need no tensor-parallel reduction.

Dropout (the gpt's `dropout` p, 0 in jobs by default): p = 0 is exact (no random numbers
are drawn). For p > 0 the model keeps two random streams of its own and leaves torch's
global generator as it found it: the attention-probability dropout (inside the parallel
region: each rank drops its own heads) draws from a stream seeded per tensor rank; every
other dropout (embedding, residual, MLP output: replicated activations) draws from a stream
seeded alike on every rank of tp, so those activations stay equal across tp. The seed is
`from_gpt(..., seed=s)` (the same s on every rank of tp; differ it between data-parallel
replicas), by default tp rank 0's `torch.initial_seed()` (one broadcast over tp, only where
p > 0). Streams are per device type (CPU / CUDA); not for CUDA graph capture at p > 0.

Layout for checkpoints: `names()` maps each of this rank's parameters to the unsplit gpt's
state_dict name and the slice it holds: {name: (full_name, dim, start, stop)}, dim None
(start, stop None) for a replicated parameter. `gather_state_dict()` (collective) rebuilds
the unsplit gpt's state_dict (its keys and order, lm_head.weight included where tied);
`load_full_state_dict(sd)` keeps this rank's slices of one.

Every rank of tp must call forward / loss / the collectives in the same order with the
same idx and targets (tensor-parallel layers are collective).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp, \
    vocab_parallel_cross_entropy

__all__ = ["TensorParallelGPT", "check_tp_sizes"]


def check_tp_sizes(vocab_size: int, n_head: int, n_embd: int, tp_size: int) -> None:
    """A one-line UserError where the tensor-parallel size does not divide the vocabulary,
    the attention heads or the MLP width."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise UserError(f"the tensor-parallel size must be a positive integer, not {tp_size!r}")
    T = tp_size
    if vocab_size % T:
        pad = -(-vocab_size // T) * T
        raise UserError(f"vocab_size = {vocab_size} is not divisible by the {T} tensor-parallel ranks "
                        f"(pad it: vocab_size = {pad}, a multiple of {T}; ids from {vocab_size} stay unused)")
    if n_head % T:
        raise UserError(f"model.args.n_head = {n_head} is not divisible by the {T} tensor-parallel ranks "
                        f"(each rank holds whole attention heads: choose n_head a multiple of {T})")
    if (4 * n_embd) % T:
        raise UserError(f"the MLP width 4 * n_embd = {4 * n_embd} is not divisible by the {T} tensor-parallel "
                        "ranks")


# -- the dropout streams ------------------------------------------------------------------------------

def _rng_get(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _rng_seed(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


class DropoutStreams:
    """Two random streams swapped into torch's generator of the input's device around the
    dropouts: "replicated" (seeded alike on every rank of tp) and "parallel" (seeded per
    tensor rank). The caller's generator state is restored afterwards."""

    def __init__(self, seed: int, tp_rank: int):
        self.seed, self.tp_rank = int(seed), tp_rank
        self.states: dict[tuple[str, str], torch.Tensor] = {}

    def _seed_of(self, kind: str) -> int:
        if kind == "replicated":
            return self.seed % 2**63
        return (self.seed * 1_000_003 + 2718 + self.tp_rank) % 2**63

    @contextlib.contextmanager
    def use(self, kind: str, device: torch.device, enabled: bool):
        if not enabled:
            yield
            return
        key = (kind, str(device))
        saved = _rng_get(device)
        if key in self.states:
            _rng_set(device, self.states[key])
        else:
            _rng_seed(device, self._seed_of(kind))
        try:
            yield
        finally:
            self.states[key] = _rng_get(device)
            _rng_set(device, saved)


# -- the layers ---------------------------------------------------------------------------------------

def _no_init(w: torch.Tensor) -> None:
    """The tensor-parallel layers' `init`: leave the full weight unfilled (load_full_state_dict
    fills this rank's slice; torch.empty does not touch the rest)."""


class TensorParallelAttention(nn.Module):
    """Causal self-attention over this rank's H/T heads: q, k, v column-parallel (one f for
    the three), c_proj row-parallel (g), then the residual dropout (replicated)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, tp, streams, device, dtype):
        super().__init__()
        self.tp, self.streams, self.dropout = tp, streams, dropout
        self.n_head_local, self.head_size = n_head // tp.size, n_embd // n_head
        kw = dict(tp=tp, init=_no_init, device=device, dtype=dtype)
        self.q = ColumnParallelLinear(n_embd, n_embd, bias, **kw)
        self.k = ColumnParallelLinear(n_embd, n_embd, bias, **kw)
        self.v = ColumnParallelLinear(n_embd, n_embd, bias, **kw)
        self.c_proj = RowParallelLinear(n_embd, n_embd, bias, input_is_parallel=True, **kw)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = copy_to_tp(x, self.tp)  # f: one allreduce of the input gradient for q, k and v together
        q, k, v = (F.linear(x, lin.weight, lin.bias).view(b, t, self.n_head_local, self.head_size).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        drop = self.dropout if self.training else 0.0
        with self.streams.use("parallel", x.device, drop > 0):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(b, t, self.n_head_local * self.head_size)
        return self.resid_dropout(self.c_proj(y))


class TensorParallelMLP(nn.Module):
    """c_fc column-parallel (4C/T hidden units here) -> GELU -> c_proj row-parallel (g) ->
    dropout (replicated)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool, tp, device, dtype):
        super().__init__()
        kw = dict(tp=tp, init=_no_init, device=device, dtype=dtype)
        self.c_fc = ColumnParallelLinear(n_embd, 4 * n_embd, bias, **kw)
        self.gelu = nn.GELU()
        self.c_proj = RowParallelLinear(4 * n_embd, n_embd, bias, input_is_parallel=True, **kw)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TensorParallelBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, tp, streams, device, dtype):
        super().__init__()
        self.streams, self.dropout = streams, dropout
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias, device=device, dtype=dtype)
        self.attn = TensorParallelAttention(n_embd, n_head, dropout, bias, tp, streams, device, dtype)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias, device=device, dtype=dtype)
        self.mlp = TensorParallelMLP(n_embd, dropout, bias, tp, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.streams.use("replicated", x.device, self.training and self.dropout > 0):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))


class VocabParallelHead(nn.Module):
    """f -> x W^T with this rank's vocabulary rows of W (the embedding's, where tied):
    logits for ids [r V/T, (r+1) V/T)."""

    def __init__(self, weight: nn.Parameter, tp):
        super().__init__()
        self.weight, self.tp = weight, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp), self.weight)

    def extra_repr(self) -> str:
        n = self.weight.shape[0]
        return f"{self.weight.shape[1]}, {n * self.tp.size} ({n} on rank {self.tp.rank} of {self.tp.size}), bias=False"


class Embed(nn.Module):
    """First pipeline block: token (vocabulary-parallel) + position embeddings -> (B, T, C),
    the same on every rank of tp."""

    def __init__(self, model: "TensorParallelGPT"):
        super().__init__()
        self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop  # (registered: this stage's parameters)
        self.__dict__["_model"] = model  # (not a submodule: the model's own embed() does the work)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._model.embed(idx, self.training)


class Head(nn.Module):
    """Last pipeline block: final LayerNorm and the vocabulary-parallel head -> this rank's
    logits shard (B, T, V/T)."""

    def __init__(self, model: "TensorParallelGPT"):
        super().__init__()
        self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


# -- the model ------------------------------------------------------------------------------------------

class TensorParallelGPT(nn.Module):
    """The gpt split over tp (see the module's docstring). Build it with `from_gpt`; the
    constructor makes the split structure with unfilled weights (LayerNorms at their
    default), to be filled by `load_full_state_dict`.

    forward(idx (B, T) ids) -> this rank's logits shard (B, T, V/T);
    loss(idx, targets) -> the mean cross-entropy over the whole vocabulary (a scalar, the
    same on every rank of tp)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float,
                 bias: bool, *, tp, tied: bool = True, seed: int = 0, device=None, dtype=None):
        super().__init__()
        check_tp_sizes(vocab_size, n_head, n_embd, tp.size)
        if n_embd % n_head:
            raise UserError(f"model.args.n_embd = {n_embd}: not divisible by model.args.n_head = {n_head}")
        self.tp = tp
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_head, self.n_embd, self.bias, self.tied = n_head, n_embd, bias, tied
        self.streams = DropoutStreams(seed, tp.rank)
        kw = dict(device=device, dtype=dtype)
        self.wte = VocabParallelEmbedding(vocab_size, n_embd, tp=tp, init=_no_init, **kw)
        self.wpe = nn.utils.skip_init(nn.Embedding, block_size, n_embd, device=device if device is not None else "cpu",
                                      dtype=dtype)  # unfilled: no draw from torch's global generator
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TensorParallelBlock(n_embd, n_head, dropout, bias, tp, self.streams, **kw)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias, **kw)
        if tied:
            head = self.wte.weight
        else:
            head = nn.Parameter(torch.empty(vocab_size // tp.size, n_embd, **kw))
            head.tp_dim = 0
        self.lm_head = VocabParallelHead(head, tp)
        self._layout = self._make_layout()

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_gpt(cls, gpt: nn.Module, *, tp, seed: int | None = None) -> "TensorParallelGPT":
        """This rank's part of an existing built-in GPT (same device, dtype and train/eval
        mode; its head tied to its embedding or not, as the gpt's). seed: the dropout
        streams' seed (see the module's docstring); only used where dropout > 0.
        Collective over tp only where dropout > 0 and seed is None."""
        blocks = list(gpt.blocks)
        if not blocks:
            raise UserError("TensorParallelGPT.from_gpt: the gpt has no blocks")
        first = blocks[0]
        n_embd, vocab_size = gpt.wte.embedding_dim, gpt.wte.num_embeddings
        n_head, bias = first.attn.n_head, first.attn.c_attn.bias is not None
        dropout = float(gpt.drop.p)
        if any(float(b.attn.dropout) != dropout for b in blocks):
            raise UserError("TensorParallelGPT.from_gpt: the gpt's blocks use different dropout rates")
        check_tp_sizes(vocab_size, n_head, n_embd, tp.size)
        if seed is None:
            seed = 0 if dropout == 0 else (tp.bcast(torch.initial_seed()) if tp.size > 1 else torch.initial_seed())
        w = gpt.wte.weight
        model = cls(vocab_size, gpt.block_size, len(blocks), n_head, n_embd, dropout, bias, tp=tp,
                    tied=gpt.lm_head.weight is gpt.wte.weight, seed=seed, device=w.device, dtype=w.dtype)
        model.load_full_state_dict(gpt.state_dict())
        return model.train(gpt.training)

    def _make_layout(self) -> dict[str, tuple]:
        """{this model's parameter name: (the gpt's state_dict name, dim, start, stop)}."""
        T, r, C, V = self.tp.size, self.tp.rank, self.n_embd, self.vocab_size

        def part(n: int, offset: int = 0) -> tuple[int, int]:  # this rank's [start, stop) of n, after offset
            return offset + r * n // T, offset + (r + 1) * n // T

        whole = (None, None, None)
        out = {"wte.weight": ("wte.weight", 0, *part(V)), "wpe.weight": ("wpe.weight", *whole)}
        for i in range(self.n_layer):
            p = f"blocks.{i}."
            for ln in ("ln_1", "ln_2"):
                out[f"{p}{ln}.weight"] = (f"{p}{ln}.weight", *whole)
            for j, which in enumerate("qkv"):  # the fused c_attn: q rows [0, C), k [C, 2C), v [2C, 3C)
                out[f"{p}attn.{which}.weight"] = (f"{p}attn.c_attn.weight", 0, *part(C, j * C))
            out[f"{p}attn.c_proj.weight"] = (f"{p}attn.c_proj.weight", 1, *part(C))
            out[f"{p}mlp.c_fc.weight"] = (f"{p}mlp.c_fc.weight", 0, *part(4 * C))
            out[f"{p}mlp.c_proj.weight"] = (f"{p}mlp.c_proj.weight", 1, *part(4 * C))
            if self.bias:
                for ln in ("ln_1", "ln_2"):
                    out[f"{p}{ln}.bias"] = (f"{p}{ln}.bias", *whole)
                for j, which in enumerate("qkv"):
                    out[f"{p}attn.{which}.bias"] = (f"{p}attn.c_attn.bias", 0, *part(C, j * C))
                out[f"{p}attn.c_proj.bias"] = (f"{p}attn.c_proj.bias", *whole)
                out[f"{p}mlp.c_fc.bias"] = (f"{p}mlp.c_fc.bias", 0, *part(4 * C))
                out[f"{p}mlp.c_proj.bias"] = (f"{p}mlp.c_proj.bias", *whole)
        out["ln_f.weight"] = ("ln_f.weight", *whole)
        if self.bias:
            out["ln_f.bias"] = ("ln_f.bias", *whole)
        if not self.tied:
            out["lm_head.weight"] = ("lm_head.weight", 0, *part(V))
        have = [n for n, _ in self.named_parameters()]
        assert sorted(have) == sorted(out), (sorted(set(have) ^ set(out)))
        return {n: out[n] for n in have}  # in named_parameters() order

    def _full_keys(self) -> list[str]:
        """The unsplit gpt's state_dict keys, in its order."""
        keys = ["wte.weight", "wpe.weight"]
        per = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias"]
        for i in range(self.n_layer):
            keys += [f"blocks.{i}.{k}" for k in per if self.bias or not k.endswith(".bias")]
        keys += ["ln_f.weight"] + (["ln_f.bias"] if self.bias else []) + ["lm_head.weight"]
        return keys

    # -- the layout, for checkpoints -----------------------------------------------------------------

    def names(self) -> dict[str, tuple[str, int | None, int | None, int | None]]:
        """{parameter name: (the unsplit gpt's state_dict name, dim, start, stop)}: this
        parameter is full[name].narrow(dim, start, stop - start); dim, start and stop are
        None for a replicated parameter (the whole tensor). Where the head is tied,
        "wte.weight" stands for the gpt's "lm_head.weight" too."""
        return dict(self._layout)

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Copy this rank's slices of the unsplit gpt's state_dict into the parameters (no
        communication)."""
        params = dict(self.named_parameters())
        missing = sorted({full for full, *_ in self._layout.values()} - set(state_dict))
        if missing:
            raise UserError(f"the gpt's state_dict lacks {', '.join(missing)}")
        with torch.no_grad():
            for name, (full, dim, start, stop) in self._layout.items():
                src = state_dict[full]
                if dim is not None:
                    src = src.narrow(dim, start, stop - start)
                dst = params[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise UserError(f"{full}: this rank's part has shape {tuple(src.shape)}, "
                                    f"the split model's {name} {tuple(dst.shape)}")
                dst.copy_(src)

    def gather_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective over tp: the unsplit gpt's state_dict (its keys in its order, with
        lm_head.weight = wte.weight where tied), on every rank of tp (detached tensors on
        the parameters' device)."""
        layouts = self.tp.allgather(self._layout) if self.tp.size > 1 else [self._layout]
        pieces: dict[str, list] = {}
        for name, p in self.named_parameters():  # the same order on every rank
            full = self._layout[name][0]
            parts = self.tp.allgather_tensor(p.detach().contiguous()) if self.tp.size > 1 else p.detach()[None]
            for q, layout in enumerate(layouts):
                pieces.setdefault(full, []).append((layout[name][1:], parts[q]))
        out = {}
        for full in self._full_keys():
            if full == "lm_head.weight" and self.tied:
                out[full] = out["wte.weight"]
                continue
            got = pieces[full]
            (dim, _, _), first = got[0]
            if dim is None:
                out[full] = first.clone()
                continue
            shape = list(first.shape)
            shape[dim] = max(stop for (_, _, stop), _ in got)
            t = first.new_empty(shape)
            for (d, start, stop), piece in got:
                t.narrow(d, start, stop - start).copy_(piece)
            out[full] = t
        return out

    # -- running -------------------------------------------------------------------------------------------

    def embed(self, idx: torch.Tensor, training: bool) -> torch.Tensor:
        """Token (vocabulary-parallel) + position embeddings, dropout on the stream every
        rank of tp shares -> (B, T, C), the same on every rank of tp."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.block_size}")
        x = self.wte(idx.long()) + self.wpe(torch.arange(t, device=idx.device))
        with self.streams.use("replicated", x.device, training and self.drop.p > 0):
            return F.dropout(x, self.drop.p, training) if self.drop.p > 0 else x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx, self.training)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Collective over tp: the mean cross-entropy of the next tokens `targets` (B, T)
        over the whole vocabulary, from the logits shards (never gathered)."""
        return vocab_parallel_cross_entropy(self(idx), targets, self.tp, ignore_index=ignore_index)

    def pipeline_blocks(self) -> list[nn.Module]:
        """[Embed, Block x n_layer, Head] sharing this model's parameters (the head's
        output is this rank's logits shard: a pipeline's loss must be
        vocab_parallel_cross_entropy over tp)."""
        return [Embed(self), *self.blocks, Head(self)]

    def extra_repr(self) -> str:
        return (f"tensor-parallel rank {self.tp.rank} of {self.tp.size}: {self.n_head // self.tp.size} of "
                f"{self.n_head} heads, vocabulary {self.vocab_size // self.tp.size} of {self.vocab_size}")
