"""Your own model and training loop with mpitrain's strategies (the Python API).

    mpiexec -n 4 python -m mpi4py scripts/train_custom.py --data data/digits/digits.h5 \
        --strategy local_sgd --option period=4 --epochs 10

A user-defined CNN, a plain PyTorch loop; mpitrain supplies the ranks, the strategy around
the optimizer, each rank's exactly-once share of the data, and checkpoints. Works with any
image-classification file in mpitrain's HDF5 layout (e.g. `mpitrain data digits`).
"""

import argparse
import tomllib

import torch
import torch.nn.functional as F
from torch import nn

import mpitrain


class SmallCNN(nn.Module):
    """The user's model: nothing mpitrain-specific in it."""

    def __init__(self, height, width, classes, channels=32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * (height // 4) * (width // 4), classes)

    def forward(self, x):
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/digits/digits.h5")
    p.add_argument("--strategy", default="allreduce")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a strategy option")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--checkpoint", default="", help="save here at the end, then restore and check it")
    args = p.parse_args()

    world = mpitrain.init()
    torch.set_num_threads(world.cores_per_rank())
    train = mpitrain.Loader(args.data, world, args.batch, split="train", mode="partitioned")
    test = mpitrain.Loader(args.data, world, 256, split="test", mode="partitioned")
    h, w = train.meta.input_shape
    torch.manual_seed(0)
    model = SmallCNN(h, w, train.meta.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    options = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (o.split("=", 1) for o in args.option)}
    model, optimizer = mpitrain.distribute(model, optimizer, strategy=args.strategy, **options)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * train.steps_per_epoch)

    for epoch in range(args.epochs):
        for x, y in train.epoch(epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) if len(y) else model(x).sum() * 0  # an empty last batch
            optimizer.backward(loss)  # not loss.backward(): weighted for the ranks, reduced in time
            optimizer.step()
            schedule.step()
        with optimizer.consolidated():  # the model every rank agrees on
            acc = accuracy(model, test, world)
        if world.is_root:
            print(f"epoch {epoch + 1}: test accuracy {acc:.4f}", flush=True)
    if args.checkpoint:
        mpitrain.save(args.checkpoint, model, optimizer, step=optimizer.steps)
        with optimizer.consolidated():
            before = accuracy(model, test, world)
        torch.nn.init.zeros_(model.head.weight)  # spoil it, then restore
        mpitrain.restore(args.checkpoint, model, optimizer)
        with optimizer.consolidated():
            after = accuracy(model, test, world)
        if world.is_root:
            print(f"restored from {args.checkpoint}: test accuracy {after:.4f} (saved {before:.4f})")
    optimizer.close()
    if world.is_root:
        print(f"final test accuracy {acc:.4f}")


@torch.no_grad()
def accuracy(model, test, world):
    correct = total = 0
    for x, y in test.epoch(0):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    correct, total = world.sum(torch.tensor([correct, total], dtype=torch.float64).numpy())
    return correct / total


if __name__ == "__main__":
    main()
