"""CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2)
in plain torch: a conv3x3 stem, stages of basic blocks, global average pooling, a linear head.

Shortcuts that change shape use the paper's option B (1x1 conv + BN projection); the paper's
CIFAR runs used option A (zero-padded identity), so ResNet-20 here has 272,474 parameters
with 10 classes instead of 269,722. No MPI here; BatchNorm is plain nn.BatchNorm2d."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UserError


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape, num_classes, depth=20, widths=(16, 32, 64), zero_init_residual=True) -> nn.Module:
    """ResNet of `len(widths)` stages with n = (depth - 2) / 6 basic blocks each; stage i has
    widths[i] channels and (after the first) halves the image with stride 2. depth counts the
    layers of the paper's 3-stage form (20, 32, 44, 56, 110); with other stage counts it still
    only sets n, e.g. widths = (64, 128, 256, 512) gives ResNet-18's widths, n blocks a stage.
    zero_init_residual: each block's last BN starts at 0, so blocks start as identities.
    Inputs (H, W) get a channel axis; (C, H, W) are used as they are."""
    if len(input_shape) not in (2, 3):
        raise UserError(f"model.name = 'resnet' needs image inputs (H, W) or (C, H, W), got {tuple(input_shape)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise UserError(f"model.args.depth = {depth!r}: expected 6n+2 with n >= 1 (20, 32, 44, 56, 110)")
    if (isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or not widths
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        raise UserError(f"model.args.widths = {widths!r}: expected a non-empty list of positive channel counts")
    layers: list[nn.Module] = []
    if len(input_shape) == 2:
        layers.append(nn.Unflatten(1, (1, input_shape[0])))  # (N, H, W) -> (N, 1, H, W)
        input_shape = (1, *input_shape)
    c = input_shape[0]
    layers += [nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    c = widths[0]
    for i, w in enumerate(widths):
        for j in range((depth - 2) // 6):
            layers.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, BasicBlock) and zero_init_residual:
            nn.init.zeros_(m.bn2.weight)
    return model
