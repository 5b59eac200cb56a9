"""KVStore: MXNet-style init / push / pull on one-sided MPI windows, optimizer store-side.

    kv = mpitrain.KVStore(world, mode="sync", optimizer="sgd", lr=0.1, momentum=0.9)
    kv.init("w", tensor)            # Collective: rank 0's value becomes the stored value
    kv.push("w", grad)              # sync: summed over all workers, then one optimizer step
    kv.pull("w", out=tensor)        # sync: the value after every worker's push of this round

Every key is a flat float32 vector sharded over the owner ranks (`comm.rma`). The
optimizer (torch's SGD / Adam / AdamW) runs on a shard with the shard's own state (momentum,
Adam moments and step), which lives in that owner's window:
- "sync" (BSP; with `staleness=s` > 0, stale-synchronous): gradients of clock c are
  accumulated into slot c % (s + 1) of every shard; the worker whose push completes the
  count applies the optimizer once to the sum (times `rescale`, default 1/workers) and bumps
  the shard's version. `pull` waits until the version is >= own clock - s, so s = 0 reads
  exactly what a synchronous step would, and reads are never more than s clocks stale. A
  worker always sees its own updates: its pushes not yet applied are added to what it
  reads as a plain SGD step (exact for SGD without momentum, first-order otherwise).
- "async" (ASGD / Downpour): `push` applies the optimizer to the worker's gradient at
  once, under the shard's exclusive lock; `pull` reads the latest values. Optional
  delay compensation (DC-ASGD, Zheng et al. 2017): g + λ g⊙g⊙(w_now − w_read).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from .comm.rma import ProgressThread, ShardedVector, wait_until
from .errors import UserError

STATE_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2}


class KVStore:
    def __init__(self, world, mode: str = "sync", *, optimizer: str = "sgd", lr: float = 0.01,
                 momentum: float = 0.0, weight_decay: float = 0.0, betas=(0.9, 0.999), nesterov: bool = False,
                 staleness: int = 0, rescale: float | None = None, dc_lambda: float = 0.0,
                 owners: list[int] | None = None, workers: int | None = None, progress: bool = True,
                 barrier_comm=None, timeout: float | None = None):
        if mode not in ("sync", "async"):
            raise UserError(f"KVStore mode must be 'sync' or 'async', got {mode!r}")
        if optimizer not in STATE_SLOTS:
            raise UserError(f"KVStore optimizer must be one of {', '.join(STATE_SLOTS)}, got {optimizer!r}")
        if staleness < 0:
            raise UserError(f"staleness must be >= 0, got {staleness}")
        self.world, self.mode, self.staleness = world, mode, staleness
        self.comm = world.comm.Dup()
        self.barrier_comm = barrier_comm or world.comm  # the pushing ranks (all, or the workers)
        self.owners = list(range(world.size)) if owners is None else list(owners)
        self.workers = workers if workers is not None else world.size
        self.rescale = rescale if rescale is not None else (1.0 / self.workers if mode == "sync" else 1.0)
        self.opt_name, self.lr, self.dc_lambda = optimizer, lr, dc_lambda
        self.opt_kw = ({"momentum": momentum, "nesterov": nesterov and momentum > 0, "weight_decay": weight_decay}
                       if optimizer == "sgd" else {"betas": tuple(betas), "weight_decay": weight_decay})
        self.timeout = timeout
        self.keys: dict[str, ShardedVector] = {}
        self.clock: dict[str, int] = {}
        self.pending: dict[str, deque] = {}
        self.staleness_seen: list[int] = []
        self.bytes_moved = 0  # bytes this rank pushed and pulled
        self._progress = ProgressThread(world.comm) if progress else None

    # -- API ----------------------------------------------------------------------------
    def init(self, key: str, value: torch.Tensor) -> None:
        """Collective: create `key` with rank 0's value."""
        if key in self.keys:
            raise UserError(f"KVStore key {key!r} already initialised")
        flat = value.detach().reshape(-1).to(torch.float32).cpu().numpy()
        n = self.comm.bcast(flat.size, root=0)  # a server may pass an empty tensor
        slots = self.staleness + 1 if self.mode == "sync" else 0
        vec = ShardedVector(self.comm, n, self.owners, state_slots=STATE_SLOTS[self.opt_name], slots=slots)
        if self.comm.Get_rank() == 0:
            vec.put_all(flat)
        self.comm.Barrier()
        self.keys[key], self.clock[key], self.pending[key] = vec, 0, deque()

    def set_lr(self, lr: float) -> None:
        """The learning rate the next optimizer steps use (e.g. from an LR schedule)."""
        self.lr = lr

    def push(self, key: str, grad: torch.Tensor, read_at: torch.Tensor | None = None) -> None:
        """Send a gradient. `read_at`: the values the gradient was computed at (DC-ASGD)."""
        vec = self._vec(key)
        g = self._numpy(grad, vec.n)
        if self.mode == "async":
            w0 = self._numpy(read_at, vec.n) if read_at is not None and self.dc_lambda else None
            for _, owner, lo, hi in self._order(vec):
                vec.modify(owner, hi - lo, lambda p, s, _a, lo=lo, hi=hi: self._apply(
                    p, s, g[lo:hi], None if w0 is None else w0[lo:hi]))
            self.bytes_moved += 2 * g.nbytes  # read-modify-write of every shard
        else:
            c = self.clock[key]
            slot = c % (self.staleness + 1)
            for _, owner, lo, hi in self._order(vec):
                vec.accumulate(owner, slot, hi - lo, g[lo:hi])
                if vec.fetch_add(owner, slot, 1) == self.workers - 1:  # the last push of clock c
                    def done(owner=owner):  # under the shard's exclusive lock
                        vec.write_ctl(owner, slot, 0)
                        vec.fetch_add(owner, vec.slots, 1)  # version c + 1: clock c is applied
                    vec.modify(owner, hi - lo, lambda p, s, a: self._apply(p, s, a * self.rescale),
                               accum_slot=slot, on_done=done)
            self.bytes_moved += g.nbytes
            if self.staleness:
                self.pending[key].append((c, -self.lr * self.rescale * g.copy()))
        self.clock[key] += 1

    def add(self, key: str, delta: torch.Tensor) -> None:
        """Add delta to the stored values, element-wise atomically, no optimizer (async use,
        e.g. the EASGD center)."""
        vec = self._vec(key)
        d = self._numpy(delta, vec.n)
        for _, owner, lo, hi in self._order(vec):
            vec.add_to_params(owner, 0, d[lo:hi])
        self.bytes_moved += d.nbytes

    def pull(self, key: str, out: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """Read the stored value into `out` (sync: waits while it is more than s clocks stale;
        fresh=True: waits until every push of this worker's clock is applied)."""
        vec = self._vec(key)
        buf = self._numpy(out, vec.n) if out.is_contiguous() and out.dtype == torch.float32 and not out.is_cuda \
            else np.empty(vec.n, np.float32)
        clock, pend = self.clock[key], self.pending[key]
        oldest = clock
        for _, owner, lo, hi in self._order(vec):
            if self.mode == "sync":
                self._wait_version(vec, owner, clock - (0 if fresh else self.staleness), lo, hi)
                version = vec.get_shard(owner, lo, buf[lo:hi], version_index=vec.slots)
                oldest = min(oldest, version)
                for c, delta in pend:  # read-my-writes: own pushes this shard has not applied yet
                    if c >= version:
                        buf[lo:hi] += delta[lo:hi]
            else:
                vec.get_shard(owner, lo, buf[lo:hi])
        self.bytes_moved += buf.nbytes
        if self.mode == "sync":
            self.staleness_seen.append(clock - oldest)
            while pend and pend[0][0] < oldest:  # applied everywhere by now
                pend.popleft()
        if out.is_cuda or buf.ctypes.data != out.data_ptr():  # pulled into a staging copy
            out.copy_(torch.from_numpy(buf).view_as(out))
        return out

    def _wait_version(self, vec, owner, need, lo, hi) -> int:
        """Wait until owner's shard has applied clock need - 1; returns its version."""
        version = vec.read_ctl(owner, vec.slots)
        if version < need:
            def ready():
                nonlocal version
                version = vec.read_ctl(owner, vec.slots)
                return version >= need
            wait_until(ready, self.timeout, f"shard {lo}:{hi} on rank {owner} to reach clock {need}")
        return version

    def barrier(self) -> None:
        """Collective over the workers: every push so far is applied when this returns."""
        self.barrier_comm.Barrier()

    def close(self) -> None:
        """Collective: free the windows and stop the progress thread."""
        self.comm.Barrier()
        for vec in self.keys.values():
            vec.free()
        self.keys.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.comm.Free()

    # -- internals ------------------------------------------------------------------------
    def _vec(self, key):
        try:
            return self.keys[key]
        except KeyError:
            raise KeyError(f"KVStore key {key!r} was not initialised (call init first)") from None

    def _order(self, vec):
        """Shards starting with a rank-dependent one, so workers do not queue on one owner."""
        s = vec.shards()
        k = self.comm.Get_rank() % len(s)
        return s[k:] + s[:k]

    @staticmethod
    def _numpy(t: torch.Tensor, n: int) -> np.ndarray:
        t = t.detach()
        if t.numel() != n:
            raise ValueError(f"KVStore: tensor has {t.numel()} elements, the key has {n}")
        if t.is_cuda or t.dtype != torch.float32 or not t.is_contiguous():
            t = t.to("cpu", torch.float32).contiguous()
        return t.reshape(-1).numpy()

    def _apply(self, params: np.ndarray, state: np.ndarray, grad: np.ndarray, read_at=None) -> None:
        """One torch optimizer step on a shard; state = [moments..., step]."""
        m = len(params)
        g = torch.from_numpy(np.ascontiguousarray(grad, dtype=np.float32))
        if read_at is not None:  # DC-ASGD delay compensation
            g = g + self.dc_lambda * g * g * (torch.from_numpy(params) - torch.from_numpy(read_at))
        p = torch.nn.Parameter(torch.from_numpy(params), requires_grad=True)
        p.grad = g
        st = torch.from_numpy(state)
        if self.opt_name == "sgd":
            opt = torch.optim.SGD([p], lr=self.lr, foreach=False, **self.opt_kw)
            if self.opt_kw["momentum"]:
                opt.state[p]["momentum_buffer"] = st[:m]
        else:
            cls = torch.optim.Adam if self.opt_name == "adam" else torch.optim.AdamW
            opt = cls([p], lr=self.lr, foreach=False, **self.opt_kw)
            opt.state[p].update(step=st[2 * m].clone(), exp_avg=st[:m], exp_avg_sq=st[m:2 * m])
        opt.step()
        state[-1] = float(opt.state[p]["step"]) if "step" in opt.state[p] else state[-1] + 1
