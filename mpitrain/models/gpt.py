"""A decoder-only transformer language model: the GPT-2 design (Radford et al. 2019) as
written in Karpathy's nanoGPT (https://github.com/karpathy/nanoGPT), reimplemented here in
plain torch. Pre-LayerNorm blocks, causal self-attention, 4x GELU MLP, learned positions and
an LM head tied to the token embedding. No MPI here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, n_head, T, C / n_head)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(idx: (B, T) integer token ids, T <= block_size) -> logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float, bias: bool):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, GPT-2 scaling
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx.long()) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def pipeline_blocks(self) -> list[nn.Module]:
        return pipeline_blocks(self)


class Embed(nn.Module):
    """The GPT's first pipeline block: token + position embeddings (B, T) -> (B, T, C)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.block_size, self.wte, self.wpe, self.drop = gpt.block_size, gpt.wte, gpt.wpe, gpt.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.block_size}")
        return self.drop(self.wte(idx.long()) + self.wpe(torch.arange(t, device=idx.device)))


class Head(nn.Module):
    """The GPT's last pipeline block: final LayerNorm and the (tied) head -> logits."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def pipeline_blocks(model: GPT) -> list[nn.Module]:
    """The GPT as a sequence of blocks sharing its parameters: [Embed, Block x n_layer,
    Head]; the head's weight is the embedding's (tied: split over two stages, each holds
    a copy and their gradients are summed)."""
    return [Embed(model), *model.blocks, Head(model)]


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} = {value!r}: expected a positive integer")
    return value


def gpt(input_shape, vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=0, dropout=0.0,
        bias=False) -> nn.Module:
    """GPT for windows of `input_shape = (seq_len,)` token ids in [0, vocab_size).
    block_size = 0 means block_size = seq_len."""
    if len(input_shape) != 1:
        raise UserError(f"model.name = 'gpt' needs token windows (seq_len,), got {tuple(input_shape)}")
    seq_len = _positive_int("data.seq_len", input_shape[0])
    _positive_int("vocab_size", vocab_size)
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        _positive_int(f"model.args.{key}", value)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise UserError(f"model.args.block_size = {block_size!r}: expected a positive integer (or 0 = data.seq_len)")
    block_size = block_size or seq_len
    if seq_len > block_size:
        raise UserError(f"model.args.block_size = {block_size}: shorter than data.seq_len = {seq_len}")
    if n_embd % n_head:
        raise UserError(f"model.args.n_embd = {n_embd}: not divisible by model.args.n_head = {n_head}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"model.args.dropout = {dropout!r}: expected a number in [0, 1)")
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, float(dropout), bool(bias))
