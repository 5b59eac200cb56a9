"""Data: HDF5 splits (partitioned or replicated), the distributed sampler, generators."""
