"""Plain-torch models sized from the data, and optimizers / LR schedules. No MPI here."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError


def mlp(cfg, input_shape, num_classes) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(cfg, input_shape, num_classes) -> nn.Module:
    """Conv3x3-ReLU-MaxPool blocks (pooling while the image is >= 4 px), then a linear head.
    Inputs (H, W) get a channel axis; (C, H, W) are used as they are."""
    if len(input_shape) not in (2, 3):
        raise UserError(f"model.name = 'cnn' needs image inputs (H, W) or (C, H, W), got {input_shape}")
    layers: list[nn.Module] = []
    if len(input_shape) == 2:
        layers += [nn.Flatten(), nn.Unflatten(1, (1, *input_shape))]  # (N, H, W) -> (N, 1, H, W)
        input_shape = (1, *input_shape)
    c, h, w = input_shape
    for out in cfg.channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(c * h * w, num_classes))
    return nn.Sequential(*layers)


MODELS = {"mlp": mlp, "cnn": cnn}


def build_model(cfg, input_shape, num_classes) -> nn.Module:
    try:
        fn = MODELS[cfg.name]
    except KeyError:
        raise UserError(f"model.name: unknown model {cfg.name!r} (known: {', '.join(MODELS)})") from None
    return fn(cfg, tuple(input_shape), num_classes)


def build_optimizer(cfg, params, world_size: int) -> torch.optim.Optimizer:
    lr = cfg.lr * (world_size if cfg.lr_scaling == "linear" else 1)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.name in ("adam", "adamw"):
        if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
            raise UserError(f"optim.betas: expected two numbers in [0, 1), got {list(cfg.betas)}")
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name: unknown optimizer {cfg.name!r} (known: sgd, adam, adamw)")


def build_schedule(cfg, optimizer, steps_per_epoch: int, epochs: int):
    """Per-step LambdaLR: linear warm-up, then constant / cosine / step decay."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(1, epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
