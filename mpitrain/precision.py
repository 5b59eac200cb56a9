"""Mixed precision for the training step (train.precision): torch.autocast around forward
and loss, and for fp16 torch's GradScaler, whose decision to skip a step is the same on
every rank. Weights, gradients and their reduction stay fp32. No MPI here: ranks agree
through `world.any`.

Where the ranks' gradients are reduced (allreduce, ps_sync...), an overflow anywhere is inf
or NaN in the reduced gradient on every rank, so every scaler sees it. Where each rank
steps on its own gradient (local SGD, BMUF, EASGD), an overflow on one rank is made every
rank's: the others mark one gradient element non-finite before unscaling, so every scaler
skips the step and backs off alike, and the scales stay equal. Checkpoints keep the
scale and its growth counter (`state_dict`), so a resumed fp16 run scales as it would have.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One job's precision: `autocast()`, `scale(loss)` before backward, `step(...)` after
    the strategy's reduction."""

    def __init__(self, name: str, device: torch.device, world, reduced: bool):
        self.name, self.device, self.world, self.reduced = name, device, world, reduced
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def scale_tensor(self) -> torch.Tensor:
        """fp16: the current loss scale as a 0-dim tensor on the device (no host sync)."""
        return self.scaler.scale(torch.ones((), device=self.device))

    def step(self, optimizer: torch.optim.Optimizer, clip_norm: float = 0.0, sq_norm=None) -> bool:
        """Collective for fp16 with local gradients: unscale, clip (the global norm of the
        gradients as they are now), step. Returns False where an fp16 overflow skipped it.
        `sq_norm()` (collective), where the optimizer holds only this rank's chunks of the
        reduced gradient (zero): their squared global norm, which clipping and the fp16
        overflow check use instead of this rank's chunks alone."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if sq_norm is not None:
            return self._step_sharded(optimizer, clip_norm, params, sq_norm)
        if self.scaler is None:
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
            return True
        if not self.reduced:  # each rank's own gradient: agree on an overflow
            bad = not all(bool(torch.isfinite(p.grad).all()) for p in params)
            if self.world.any(bad) and not bad and params:
                params[0].grad.view(-1)[0] = float("inf")
        self.scaler.unscale_(optimizer)
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scaler backs off only after a skipped step

    def _step_sharded(self, optimizer, clip_norm: float, params, sq_norm) -> bool:
        if self.scaler is None:
            if clip_norm:
                _clip(params, clip_norm, math.sqrt(sq_norm()))
            optimizer.step()
            return True
        sq = sq_norm()  # of the scaled gradients: not finite where any rank's chunk overflowed
        if not math.isfinite(sq) and params:  # make every rank's scaler skip and back off alike
            params[0].grad.view(-1)[0] = float("inf")
        self.scaler.unscale_(optimizer)
        if clip_norm and math.isfinite(sq):
            _clip(params, clip_norm, math.sqrt(sq) / self.scaler.get_scale())  # a power of two: exact
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, np.ndarray]:
        """fp16: the loss scale and the count of good steps towards its next growth (the same
        on every rank); {} otherwise."""
        if self.scaler is None:
            return {}
        sd = self.scaler.state_dict()
        return {"scale": np.array([sd["scale"]], np.float64), "growth_tracker": np.array([sd["_growth_tracker"]])}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> bool:
        """Continue from `state_dict`'s arrays; False (and a fresh scaler) where they are
        missing (a checkpoint of a run in another precision, or older than this)."""
        if self.scaler is None or set(arrays) != {"scale", "growth_tracker"}:
            return False
        sd = self.scaler.state_dict()
        sd.update(scale=float(arrays["scale"][0]), _growth_tracker=int(arrays["growth_tracker"][0]))
        self.scaler.load_state_dict(sd)
        return True


def _clip(params, max_norm: float, total: float) -> None:
    """Scale the gradients to a global 2-norm of at most max_norm, as
    torch.nn.utils.clip_grad_norm_ does given the norm `total`."""
    coef = min(max_norm / (total + 1e-6), 1.0)
    for p in params:
        p.grad.mul_(coef)
