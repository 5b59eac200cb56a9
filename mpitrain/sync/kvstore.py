"""KVStore: MXNet-style init / push / pull on one-sided MPI windows, optimizer store-side.

    from mpitrain import kvstore
    kv = kvstore.create(world, "dist_sync")        # Collective; or "dist_async", "dist_ssp"
    kv.set_optimizer(kvstore.StoreOptimizer("sgd", lr=0.1, momentum=0.9))
    kv.init("w", tensor)            # Collective: rank 0's value becomes the stored value
    kv.push("w", grad)              # dist_sync: summed over all workers, then one optimizer step
    kv.pull("w", out=tensor)        # dist_sync: the value after every worker's push of this round

Every key is a flat float32 vector sharded over the owner ranks (`comm.rma`). The
optimizer (torch's SGD / Adam / AdamW) runs on a shard with the shard's own state (momentum,
Adam moments and step), which lives in that owner's window:
- "dist_sync" (BSP) and "dist_ssp" (stale-synchronous, `staleness=s` > 0): gradients of
  clock c are accumulated into slot c % (s + 1) of every shard; the worker whose push
  completes the count applies the optimizer once to the sum (times `rescale`, default
  1/workers) and bumps the shard's version. `pull` waits until the version is >= own clock
  - s, so s = 0 reads exactly what a synchronous step would, and reads are never more than
  s clocks stale. A worker always sees its own updates: its pushes not yet applied are
  added to what it reads as a plain SGD step (exact for SGD without momentum, first-order
  otherwise).
- "dist_async" (ASGD / Downpour): `push` applies the optimizer to the worker's gradient at
  once, under the shard's exclusive lock; `pull` reads the latest values. Optional
  delay compensation (DC-ASGD, Zheng et al. 2017): g + λ g⊙g⊙(w_now − w_read).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..comm.rma import ProgressThread, ShardedVector, wait_until
from ..errors import UserError

STATE_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2}
TYPES = {"dist_sync": "sync", "dist_ssp": "sync", "dist_async": "async"}


@dataclass(frozen=True)
class StoreOptimizer:
    """The optimizer the store applies to pushed gradients (torch's SGD, Adam or AdamW).
    `rescale` multiplies each applied gradient (None: 1/workers for a summed dist_sync
    round, 1 for dist_async), like MXNet's rescale_grad."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    rescale: float | None = None

    def __post_init__(self):
        if self.name not in STATE_SLOTS:
            raise UserError(f"KVStore optimizer must be one of {', '.join(STATE_SLOTS)}, got {self.name!r}")

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, rescale: float | None = None) -> "StoreOptimizer":
        """The same optimizer as a torch SGD / Adam / AdamW with one parameter group."""
        g = optimizer.param_groups[0]
        kinds = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
        name = kinds.get(type(optimizer))
        if name is None or len(optimizer.param_groups) != 1:
            raise UserError(f"a parameter store applies SGD, Adam or AdamW with one parameter group, "
                            f"not {type(optimizer).__name__} with {len(optimizer.param_groups)} groups")
        if name == "sgd":
            return cls(name, g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], rescale=rescale)
        return cls(name, g["lr"], weight_decay=g["weight_decay"], betas=tuple(g["betas"]), rescale=rescale)

    def torch_step(self, params: torch.Tensor, grad: torch.Tensor, state: torch.Tensor) -> float:
        """One optimizer step on a flat shard; state = [moments..., step]; returns the step."""
        m = len(params)
        p = torch.nn.Parameter(params, requires_grad=True)
        p.grad = grad
        if self.name == "sgd":
            opt = torch.optim.SGD([p], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                  nesterov=self.nesterov and self.momentum > 0, foreach=False)
            if self.momentum:
                opt.state[p]["momentum_buffer"] = state[:m]
        else:
            cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
            opt = cls([p], lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, foreach=False)
            opt.state[p].update(step=state[2 * m].clone(), exp_avg=state[:m], exp_avg_sq=state[m:2 * m])
        opt.step()
        return float(opt.state[p]["step"]) if "step" in opt.state[p] else float(state[-1]) + 1


def create(world, type: str = "dist_sync", *, staleness: int = 0, dc_lambda: float = 0.0, servers: int = 0,
           workers=None, timeout: float | None = None, progress: bool = True) -> "KVStore":
    """Collective over `world` (every rank of the job): a store whose shards live on every
    rank, or on the last `servers` ranks (which then only host; `workers` is the pushing
    ranks' World on the others, None on the servers). `timeout`: seconds a pull may wait."""
    if type not in TYPES:
        raise UserError(f"KVStore type must be one of {', '.join(TYPES)}, got {type!r}")
    if staleness < 0 or (staleness and type != "dist_ssp"):
        raise UserError(f"KVStore staleness must be >= 0 and is for dist_ssp only, got {staleness} for {type}")
    if dc_lambda and type != "dist_async":
        raise UserError(f"KVStore dc_lambda (delay compensation) is for dist_async only, got {type}")
    if not 0 <= servers < world.size:
        raise UserError(f"KVStore servers = {servers} must leave a worker among {world.size} ranks")
    return KVStore(world, type, staleness, dc_lambda, servers, workers, timeout, progress)


class KVStore:
    """A sharded key-value store of float32 vectors; make one with `create`."""

    def __init__(self, world, type, staleness, dc_lambda, servers, workers, timeout, progress):
        self.world, self.type, self.staleness, self.dc_lambda = world, type, staleness, dc_lambda
        self.mode = TYPES[type]
        self.own = world.dup()  # the store's private communicator
        self.owners = list(range(world.size - servers, world.size)) if servers else list(range(world.size))
        self.num_workers = world.size - servers
        self.workers = workers if workers is not None else (world if not servers else None)
        self.optimizer = StoreOptimizer()
        self.timeout = timeout
        self.keys: dict[str, ShardedVector] = {}
        self.clock: dict[str, int] = {}
        self.pending: dict[str, deque] = {}
        self._staleness_seen: list[int] = []
        self._progress = ProgressThread(world.comm) if progress else None
        self._closed = False

    @property
    def rank(self) -> int:
        """This worker's rank among the workers (MXNet's kv.rank)."""
        return self.world.rank

    @property
    def _rescale(self) -> float:
        r = self.optimizer.rescale
        return r if r is not None else (1.0 / self.num_workers if self.mode == "sync" else 1.0)

    # -- API ----------------------------------------------------------------------------
    def set_optimizer(self, optimizer: StoreOptimizer) -> None:
        """The optimizer (and learning rate) the next updates use. Its kind fixes the size of
        the per-shard state, so it may change kind only before the first `init`."""
        self._check_open()
        if self.keys and optimizer.name != self.optimizer.name:
            raise UserError(f"KVStore: set_optimizer({optimizer.name!r}) after init with {self.optimizer.name!r}")
        self.optimizer = optimizer

    def init(self, key: str, value: torch.Tensor) -> None:
        """Collective: create `key` with rank 0's value (servers may pass an empty tensor)."""
        self._check_open()
        if key in self.keys:
            raise UserError(f"KVStore key {key!r} already initialised")
        flat = value.detach().reshape(-1).to(torch.float32).cpu().numpy()
        n, opt = self.own.bcast((flat.size, self.optimizer.name))
        slots = self.staleness + 1 if self.mode == "sync" else 0
        vec = ShardedVector(self.own.comm, n, self.owners, state_slots=STATE_SLOTS[opt], slots=slots)
        if self.own.is_root:
            vec.put_all(flat)
        self.own.barrier()
        self.keys[key], self.clock[key], self.pending[key] = vec, 0, deque()

    def push(self, key: str, grad: torch.Tensor, read_at: torch.Tensor | None = None) -> None:
        """Send a gradient. `read_at`: the values the gradient was computed at (DC-ASGD)."""
        vec = self._vec(key)
        g = self._numpy(grad, vec.n)
        if self.mode == "async":
            w0 = self._numpy(read_at, vec.n) if read_at is not None and self.dc_lambda else None
            for _, owner, lo, hi in self._order(vec):
                vec.modify(owner, hi - lo, lambda p, s, _a, lo=lo, hi=hi: self._apply(
                    p, s, g[lo:hi] * self._rescale, None if w0 is None else w0[lo:hi]))
        else:
            c = self.clock[key]
            slot = c % (self.staleness + 1)
            for _, owner, lo, hi in self._order(vec):
                vec.accumulate(owner, slot, hi - lo, g[lo:hi])
                if vec.fetch_add(owner, slot, 1) == self.num_workers - 1:  # the last push of clock c
                    def done(owner=owner):  # under the shard's exclusive lock
                        vec.write_ctl(owner, slot, 0)
                        vec.fetch_add(owner, vec.slots, 1)  # version c + 1: clock c is applied
                    vec.modify(owner, hi - lo, lambda p, s, a: self._apply(p, s, a * self._rescale),
                               accum_slot=slot, on_done=done)
            if self.staleness:
                self.pending[key].append((c, -self.optimizer.lr * self._rescale * g.copy()))
        self.clock[key] += 1

    def add(self, key: str, delta: torch.Tensor) -> None:
        """Add delta to the stored values, element-wise atomically, no optimizer (an
        extension to MXNet's API, e.g. for the EASGD center)."""
        vec = self._vec(key)
        d = self._numpy(delta, vec.n)
        for _, owner, lo, hi in self._order(vec):
            vec.add_to_params(owner, 0, d[lo:hi])

    def pull(self, key: str, out: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """Read the stored value into `out` (dist_sync/ssp: waits while it is more than s
        clocks stale; fresh=True: waits until every push of this worker's clock is applied)."""
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
        if self.mode == "sync":
            self._staleness_seen.append(clock - oldest)
            while pend and pend[0][0] < oldest:  # applied everywhere by now
                pend.popleft()
        if out.is_cuda or buf.ctypes.data != out.data_ptr():  # pulled into a staging copy
            out.copy_(torch.from_numpy(buf).view_as(out))
        return out

    def pop_staleness(self) -> list[int]:
        """How many clocks behind each pull since the last call was (dist_sync/ssp)."""
        seen, self._staleness_seen = self._staleness_seen, []
        return seen

    def barrier(self) -> None:
        """Collective over the workers: every push so far is applied when this returns."""
        self._check_open()
        self.workers.barrier()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Collective over the workers: `KEY.value`, `KEY.optimizer` (state_slots x n) and
        `KEY.step` of every key, complete on rank 0 ({} elsewhere), after every push so far."""
        self.barrier()
        out = {}
        if self.world.is_root:
            for key, vec in self.keys.items():
                params, opt, step = vec.read_all()
                out.update({f"{key}.value": params, f"{key}.optimizer": opt, f"{key}.step": np.array(step)})
        self.barrier()
        return out

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Collective over the workers: restore values (and optimizer state where present)
        from `state_dict` arrays, resharded over this store's owners (any number of ranks)."""
        self.barrier()
        if self.world.is_root:
            for key, vec in self.keys.items():
                if f"{key}.value" in arrays:
                    vec.write_all(np.asarray(arrays[f"{key}.value"], np.float32), arrays.get(f"{key}.optimizer"),
                                  float(arrays.get(f"{key}.step", 0)))
        self.barrier()

    def save_optimizer_states(self, path: str) -> None:
        """Collective over the workers: rank 0 writes every key's state to an HDF5 file."""
        import h5py

        state = self.state_dict()
        if self.world.is_root:
            with h5py.File(path, "w") as f:
                for k, v in state.items():
                    f[k] = v

    def load_optimizer_states(self, path: str) -> None:
        """Collective over the workers: restore what save_optimizer_states wrote."""
        import h5py

        arrays = {}
        if self.world.is_root:
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                             else None)
        self.load_state_dict(arrays)

    def close(self) -> None:
        """Collective over the whole job: free the windows and stop the progress thread."""
        if self._closed:
            return
        self.own.barrier()
        for vec in self.keys.values():
            vec.free()
        self.keys.clear()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.own.free()
        self._closed = True

    # -- internals ------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise UserError("KVStore: used after close()")

    def _vec(self, key):
        self._check_open()
        try:
            return self.keys[key]
        except KeyError:
            raise UserError(f"KVStore key {key!r} was not initialised (call init first)") from None

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

    def _order(self, vec):
        """Shards starting with a rank-dependent one, so workers do not queue on one owner."""
        s = vec.shards()
        k = self.own.rank % len(s)
        return s[k:] + s[:k]

    @staticmethod
    def _numpy(t: torch.Tensor, n: int) -> np.ndarray:
        t = t.detach()
        if t.numel() != n:
            raise UserError(f"KVStore: tensor has {t.numel()} elements, the key has {n}")
        if t.is_cuda or t.dtype != torch.float32 or not t.is_contiguous():
            t = t.to("cpu", torch.float32).contiguous()
        return t.reshape(-1).numpy()

    def _apply(self, params: np.ndarray, state: np.ndarray, grad: np.ndarray, read_at=None) -> None:
        """One optimizer step on a shard (DC-ASGD delay compensation when read_at is given)."""
        g = torch.from_numpy(np.ascontiguousarray(grad, dtype=np.float32))
        if read_at is not None:
            g = g + self.dc_lambda * g * g * (torch.from_numpy(params) - torch.from_numpy(read_at))
        state[-1] = self.optimizer.torch_step(torch.from_numpy(params), g, torch.from_numpy(state))
