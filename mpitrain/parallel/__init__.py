"""Model parallelism: pipeline stages (pipeline.py, schedules in schedule.py) and tensor-
parallel layers (tensor.py: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
vocab_parallel_cross_entropy and the f/g operators), imported on first use."""

_TENSOR = ("ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "CopyToTensorParallel", "ReduceFromTensorParallel", "GatherFromTensorParallel", "ScatterToTensorParallel",
           "VocabParallelCrossEntropy", "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
           "tp_sizes")

__all__ = list(_TENSOR)


def __getattr__(name):  # lazy: importing mpitrain.parallel.schedule does not load torch or MPI
    if name in _TENSOR:
        from . import tensor

        return getattr(tensor, name)
    raise AttributeError(f"module 'mpitrain.parallel' has no attribute {name!r}")
