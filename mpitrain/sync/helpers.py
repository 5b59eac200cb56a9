"""Small pieces the strategies share: a flat parameter buffer, a period counter, and
replicated tensors as checkpoint arrays."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import UserError


class FlatParams:
    """A model's trainable parameters and their gradients as views of two flat buffers
    (`data`, `grad`), so one collective or store access covers the whole model."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len({p.dtype for p in self.params}) > 1 or len({p.device for p in self.params}) > 1:
            raise UserError("this strategy needs all parameters of one dtype on one device")
        n = sum(p.numel() for p in self.params)
        like = self.params[0]
        self.data = torch.empty(n, dtype=like.dtype, device=like.device)
        self.grad = torch.zeros(n, dtype=like.dtype, device=like.device)
        self._views = []
        off = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                self.data[off:off + k].copy_(p.reshape(-1))
                p.data = self.data[off:off + k].view_as(p)
                self._views.append(self.grad[off:off + k].view_as(p))
                off += k
        self.attach_grads()

    def attach_grads(self) -> None:
        """Every .grad is its view of `grad` again."""
        for p, v in zip(self.params, self._views):
            p.grad = v

    def gather_grads(self) -> torch.Tensor:
        """`grad` holding this step's gradients, also if someone replaced .grad (e.g.
        zero_grad(set_to_none=True)): such a gradient is copied in and the view restored."""
        for p, v in zip(self.params, self._views):
            if p.grad is None:
                v.zero_()
            elif p.grad is not v:
                v.copy_(p.grad)
            p.grad = v
        return self.grad

    def detach_grads(self) -> None:
        """No .grad at all: the local optimizer step becomes a no-op."""
        for p in self.params:
            p.grad = None


class Every:
    """Runs `action` every `period` steps (`tick()` once per step), and on `flush()` if
    steps were counted since it last ran (to consolidate before evaluation or a save)."""

    def __init__(self, period: int, action):
        self.period, self.action, self.count = period, action, 0

    def tick(self) -> None:
        self.count += 1
        if self.count >= self.period:
            self.flush()

    def flush(self) -> None:
        if self.count:
            self.count = 0
            self.action()


class LocalSteps:
    """The step hooks and checkpoint state of a strategy that steps each rank on its own
    gradient and runs `self.block` (an `Every`, made in setup) every few steps and at each
    consolidation. Its state: the steps into the current block and the tensors named in
    `self.replicated` (identical on every rank, e.g. a center)."""

    sums_gradients = False
    replicas_differ = True  # local steps: every rank's own parameters and optimizer state
    replicated: dict[str, torch.Tensor] = {}

    def after_backward(self, step):
        pass

    def after_step(self, step):
        self.block.tick()

    @contextlib.contextmanager
    def consolidated(self):
        self.block.flush()
        yield

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"block_count": np.array(self.block.count)} | to_arrays(**self.replicated)

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        if "block_count" in arrays:
            self.block.count = int(arrays["block_count"])
        load_arrays(arrays, **self.replicated)


def to_arrays(**tensors: torch.Tensor) -> dict[str, np.ndarray]:
    """Replicated tensors (identical on every rank) as checkpoint arrays."""
    return {k: t.detach().cpu().numpy().copy() for k, t in tensors.items()}


def load_arrays(arrays: dict[str, np.ndarray], **tensors: torch.Tensor) -> None:
    """Copy checkpoint arrays into replicated tensors of the same names (missing: kept)."""
    for k, t in tensors.items():
        if k in arrays:
            t.copy_(torch.from_numpy(np.asarray(arrays[k])).view_as(t))


@torch.no_grad()
def average_buffers(model: torch.nn.Module, world) -> None:
    """Collective: replace the model's floating-point buffers (BatchNorm running statistics)
    by their mean over ranks, so evaluation and checkpoints see one model. Integer buffers
    (batch counters) are left alone. Nothing is sent for a model without buffers."""
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs or world.size == 1:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float32) for b in bufs])
    world.average_(flat)
    off = 0
    for b in bufs:
        b.copy_(flat[off:off + b.numel()].view_as(b))
        off += b.numel()
