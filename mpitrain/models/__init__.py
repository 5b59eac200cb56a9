"""Plain-torch models sized from the data, and optimizers / LR schedules. No MPI here."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..callables import resolve
from ..errors import UserError, out_of_memory


def mlp(input_shape, num_classes=0, hidden=(128, 128), dropout=0.0, num_outputs=0) -> nn.Module:
    """Flatten, then Linear-ReLU(-Dropout) layers; the head has num_classes (or, for
    regression, num_outputs) outputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes or num_outputs))
    return nn.Sequential(*layers)


def cnn(input_shape, num_classes=0, channels=(16, 32), dropout=0.0, num_outputs=0) -> nn.Module:
    """Conv3x3-ReLU-MaxPool blocks (pooling while the image is >= 4 px), then a linear head.
    Inputs (H, W) get a channel axis; (C, H, W) are used as they are."""
    if len(input_shape) not in (2, 3):
        raise UserError(f"model.name = 'cnn' needs image inputs (H, W) or (C, H, W), got {input_shape}")
    layers: list[nn.Module] = []
    if len(input_shape) == 2:
        layers += [nn.Flatten(), nn.Unflatten(1, (1, *input_shape))]  # (N, H, W) -> (N, 1, H, W)
        input_shape = (1, *input_shape)
    c, h, w = input_shape
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c * h * w, num_classes or num_outputs))
    return nn.Sequential(*layers)


# the built-in models are factories like any user's: model.name = "mlp" is
# model.factory = "mpitrain.models:mlp" with model.hidden / model.dropout as arguments
BUILTIN = {"mlp": ("mpitrain.models:mlp", ("hidden", "dropout")),
           "cnn": ("mpitrain.models:cnn", ("channels", "dropout")),
           "resnet": ("mpitrain.models.resnet:resnet", ()),
           "gpt": ("mpitrain.models.gpt:gpt", ("dropout",))}
FOR_TOKENS = ("gpt",)  # the built-ins that take token streams (and only those)


def model_id(cfg) -> str:
    """What a checkpoint records about the model's code: the factory string."""
    return cfg.factory or BUILTIN.get(cfg.name, (f"?{cfg.name}",))[0]


def build_model(cfg, meta, job_dir: str = "") -> nn.Module:
    """Call the model factory with [model.args] plus what the data says (meta.factory_kwargs:
    input_shape and num_classes, num_outputs or vocab_size)."""
    if cfg.factory:
        fn, kwargs, key = resolve(cfg.factory, "model.factory", job_dir), dict(cfg.args), "model.factory"
    else:
        if cfg.name not in BUILTIN:
            raise UserError(f"model.name: unknown model {cfg.name!r} (known: {', '.join(BUILTIN)}; "
                            "or set model.factory to your own)")
        if (meta.task == "lm") != (cfg.name in FOR_TOKENS):
            raise UserError(f"model.name = {cfg.name!r} " + (
                "cannot take a token stream: use 'gpt' or your own model.factory" if meta.task == "lm" else
                "needs a token stream (GROUP/tokens with data.seq_len); this data has samples and targets"))
        spec, fields = BUILTIN[cfg.name]
        fn, key = resolve(spec, "model.name"), "model.name"
        kwargs = {f: getattr(cfg, f) for f in fields} | dict(cfg.args)
    try:
        model = fn(**meta.factory_kwargs(), **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        if out_of_memory(e):  # not bad input: the model does not fit (exit 5, mpitrain.cli)
            raise
        raise UserError(f"{key} = {cfg.factory or cfg.name!r} failed to build the model with "
                        f"{sorted(kwargs) or 'no [model.args]'} ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{key} = {cfg.factory or cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"{key} = {cfg.factory or cfg.name!r}: the model has no trainable parameters")
    return model


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
