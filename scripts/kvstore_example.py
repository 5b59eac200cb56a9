"""A user's own training script on the KVStore (run: mpiexec -n 4 python -m mpi4py scripts/kvstore_example.py).

Least squares y = X w with every rank holding its own rows; the store applies momentum
SGD on its shards of w, and all ranks read the same w after every round.
"""

import torch

import mpitrain
from mpitrain import kvstore

world = mpitrain.World.create()
torch.manual_seed(world.rank)
X = torch.randn(256, 20)
y = X @ torch.arange(20.0)  # every rank's data agrees on the true w = 0, 1, ..., 19

kv = kvstore.create(world, "dist_sync")
kv.set_optimizer(kvstore.StoreOptimizer("sgd", lr=0.05, momentum=0.9))
w = torch.zeros(20)
kv.init("w", w)
for step in range(300):
    grad = 2 * X.T @ (X @ w - y) / len(y)
    kv.push("w", grad)          # summed over ranks, rescaled by 1/N, one optimizer step
    kv.pull("w", out=w)         # everyone now holds the same w
kv.close()
if world.rank == 0:
    print(f"w[:5] = {w[:5].tolist()}  (true: 0..4), max error {(w - torch.arange(20.0)).abs().max():.2e}")
